// Shared declarations of the fused CPU step (docs/SPEC.md; kappa > 0 for the buffered
// variants).
//
// step.cpp is the op's boundary (argument checks, registration); buffered.cpp and
// adaptive.cpp compute the per-tensor decisions (keys, insert slot, counts, steps, bias
// corrections, with decide.h's rules; adaptive memory: beta) and drive the parallel
// passes (passes.h); the vectorised per-chunk kernels live in step_kernels.h, compiled
// once per CPU capability (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp) and
// picked at run time.
#pragma once

#include <cstdint>

namespace cm_fused {

// The optimizer a step computes: cm_fused.contract.Variant, same numbers.
// The buffered ones come first (kNumBuffered of them), then the adaptive-memory ones.
enum Variant : int {
  kAdamCM = 0,
  kAdamCG = 1,
  kSGDCG = 2,
  kRMSpropCG = 3,
  kAdamAM = 4,
  kSGDAM = 5,
  kNumBuffered = 4,
  kNumVariants = 6,
  kNumAM = kNumVariants - kNumBuffered,
};

// Phase of a step split in two: cm_fused.contract.Phase (SGD_AM: over param groups;
// every other variant: around the sum of the reduce pass's sums over processes).
enum Phase : int { kPhaseAll = 0, kPhaseReduce = 1, kPhaseUpdate = 2 };

// Sums the adaptive-memory reduce pass returns per chunk: ADAM_AM's D, M, X, Y; SGD_AM's
// D, N (the rest zero).
constexpr int kAMSums = 4;

// Storage dtypes the kernels take (parameters, gradients and their state: one of them;
// buffer slots: one of them, possibly another, or int8). Arithmetic is always fp32.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3, kI8 = 3, kNumSlotDTypes = 4 };

// int8 slots: one fp32 scale per kQBlock elements of a slot (cm_fused/quantize.py, whose
// QBLOCK this must equal: step_cpu checks the scales' sizes). It divides kChunk
// (passes.h), so a block never straddles two chunks.
constexpr int64_t kQBlock = 256;

// cm_fused/rounding.py's mixer, a bijection of uint32 (wrapping arithmetic): the hash
// the stochastic rounding of the params draws its bits from, the same on every backend.
inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  return x ^ (x >> 15);
}

// Everything the update pass needs for one tensor. Pointers are to element 0; a state
// role the variant or the configuration does not use is nullptr.
struct UpdateArgs {
  void* p = nullptr;
  const void* g = nullptr;
  void* mom = nullptr;    // momenta: Adam's m; SGD's and RMSprop's momentum buffer
  void* sq = nullptr;     // second moments: Adam's v; RMSprop's square average
  void* extra = nullptr;  // extras: Adam's v_max (amsgrad); RMSprop's grad average
  void* slot = nullptr;   // B[j] when this step replaces/fills a slot, else nullptr
  float* slot_scales = nullptr;  // int8 slots: B[j]'s scales (with slot), else nullptr
  // A deferred insert (AdamCM, fp32 params): the slot (and its scales) that the momentum
  // as stored goes into before this step reads S; nullptr: none pending.
  void* flush_slot = nullptr;
  float* flush_scales = nullptr;
  float* sum = nullptr;   // S (always fp32); nullptr: none kept (int8 slots, see below)
  // Slots without a running sum: every slot and scale of the buffer (C slots of numel
  // elements), which the update sums block by block.
  const void* slots = nullptr;
  const float* all_scales = nullptr;
  int64_t n_slots = 0;
  int64_t numel = 0;
  // 8-bit moments (mom, sq: uint8 codes): their per-kQBlock scales, rows 0 and 1 of the
  // tensor's moment_scales (nullptr where the role is unused).
  float* mom_scales = nullptr;
  float* sq_scales = nullptr;
  // ... and where the update stores the roots of the new second moments it computes
  // (element i of the range at root + i), which their encoder then takes as magnitudes;
  // nullptr: the encoder computes them.
  float* root = nullptr;
  bool first = false;     // count was 0: the tensor's first step
  bool has_wd = false;
  bool scaled = false;    // divide gradients by grad_scale
  bool sum_squares = false;  // the update also sums the gradient's squares (deferring)
  // Stochastic rounding of the param's stores (bf16/fp16 params; cm_fused/rounding.py):
  // element e draws mix(round_key ^ (round_offset + e)), round_key = mix(key ^ step)
  // with this step's count after it (the per-step half of the hash, done once here).
  bool round = false;
  uint32_t round_key = 0;
  uint32_t round_offset = 0;  // the tensor's element offset, mod 2^32
  float grad_scale = 1.f;
  float wd = 0.f;         // weight decay (coupled variants)
  float wd_factor = 1.f;  // 1 - lr * weight_decay (decoupled: AdamCM)
  float lr = 0.f;
  float beta1 = 0.f;      // Adam's beta1; SGD's and RMSprop's momentum
  float one_minus_beta1 = 1.f;
  float beta2 = 0.f;      // Adam's beta2; RMSprop's alpha
  float one_minus_beta2 = 1.f;
  float one_minus_dampening = 1.f;
  float k_before = 1.f;   // max(count before the insert, 1)
  float step_size = 0.f;  // lr / bc1
  float sqrt_bc2 = 1.f;
  float eps = 0.f;
  // Adaptive memory (mom: d, sq: v; first: the tensor's step was 0).
  float lam = 0.f;
  float one_plus_lam = 1.f;
  float am_c = 1.f;           // ADAM_AM: P's factor max(1 - beta1max * prod, FLT_MIN)
  float inv_sqrt_bc2 = 1.f;   // ADAM_AM: 1 / sqrt(1 - beta2^step), fp64 rounded to fp32
  float beta = 0.f;           // ADAM_AM: this step's beta
  float one_minus_beta = 1.f;
  float coef_d = 0.f;         // SGD_AM: (beta + lam) / (1 + lam)
  float coef_g = 0.f;         // SGD_AM: (1 - beta) / (1 + lam)
};

// Sum of squares of (g / grad_scale) over [begin, end): fp32 lanes, combined in a fixed
// order into a double. Same bits whatever thread runs it.
using NormFn = double (*)(const void* g, int64_t begin, int64_t end, bool scaled,
                          float grad_scale);
// The update of elements [begin, end) of one tensor.
using UpdateFn = void (*)(const UpdateArgs& a, int64_t begin, int64_t end);
// The same for the buffered variants; with a.sum_squares it also returns the sum of
// squares of (g / grad_scale) over [begin, end), NormFn's bits (else 0).
using CMUpdateFn = double (*)(const UpdateArgs& a, int64_t begin, int64_t end);
// Adaptive memory's sums over elements [begin, end) of one tensor, into sums[kAMSums]:
// fp32 terms added into fp64 lanes, combined in a fixed order (same bits on any thread).
using AMReduceFn = void (*)(const UpdateArgs& a, int64_t begin, int64_t end, double* sums);

struct KernelTable {
  const char* name;
  NormFn norm[kNumDTypes];                                // by gradient dtype
  // [variant][param][slot][8-bit moments]
  CMUpdateFn update[kNumBuffered][kNumDTypes][kNumSlotDTypes][2];
  // [variant - kAdamAM][param][8-bit moments]
  AMReduceFn am_reduce[kNumAM][kNumDTypes][2];
  UpdateFn am_update[kNumAM][kNumDTypes][2];
};

namespace DEFAULT {
const KernelTable& kernel_table();
}
namespace AVX2 {
const KernelTable& kernel_table();
}
namespace AVX512 {
const KernelTable& kernel_table();
}

}  // namespace cm_fused
