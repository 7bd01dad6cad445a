// Shared declarations of the fused CPU step (docs/SPEC.md, kappa > 0).
//
// step.cpp validates the op's arguments, computes the per-tensor decisions (keys,
// insert slot, counts, steps, bias corrections) and drives the two parallel passes; the
// vectorised per-chunk kernels live in step_kernels.h, compiled once per CPU capability
// (kernels_default.cpp, kernels_avx2.cpp) and picked at run time.
#pragma once

#include <cstdint>

namespace cm_fused {

// The optimizer a step computes: cm_fused.contract.Variant, same numbers.
enum Variant : int { kAdamCM = 0, kAdamCG = 1, kSGDCG = 2, kRMSpropCG = 3, kNumVariants = 4 };

// Storage dtypes the kernels take (parameters, gradients and their state: one of them;
// buffer slots: one of them, possibly another). Arithmetic is always fp32.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };

// Everything the update pass needs for one tensor. Pointers are to element 0; a state
// role the variant or the configuration does not use is nullptr.
struct UpdateArgs {
  void* p = nullptr;
  const void* g = nullptr;
  void* mom = nullptr;    // momenta: Adam's m; SGD's and RMSprop's momentum buffer
  void* sq = nullptr;     // second moments: Adam's v; RMSprop's square average
  void* extra = nullptr;  // extras: Adam's v_max (amsgrad); RMSprop's grad average
  void* slot = nullptr;   // B[j] when this step replaces/fills a slot, else nullptr
  float* sum = nullptr;   // S (always fp32)
  bool first = false;     // count was 0: the tensor's first step
  bool has_wd = false;
  bool scaled = false;    // divide gradients by grad_scale
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
};

// Sum of squares of (g / grad_scale) over [begin, end): fp32 lanes, combined in a fixed
// order into a double. Same bits whatever thread runs it.
using NormFn = double (*)(const void* g, int64_t begin, int64_t end, bool scaled,
                          float grad_scale);
// The update of elements [begin, end) of one tensor.
using UpdateFn = void (*)(const UpdateArgs& a, int64_t begin, int64_t end);

struct KernelTable {
  const char* name;
  NormFn norm[kNumDTypes];                                // by gradient dtype
  UpdateFn update[kNumVariants][kNumDTypes][kNumDTypes];  // [variant][param][slot dtype]
};

namespace DEFAULT {
const KernelTable& kernel_table();
}
namespace AVX2 {
const KernelTable& kernel_table();
}

}  // namespace cm_fused
