// Shared declarations of the fused Adam+CM CPU step (shared/SPEC.md, kappa > 0).
//
// adam_cm.cpp validates the op's arguments, computes the per-tensor decisions (keys,
// argmin, replace flag, counts, steps, bias corrections) and drives the two parallel
// passes; the vectorised per-chunk kernels live in adam_cm_kernels.h, compiled once per
// CPU capability (kernels_default.cpp, kernels_avx2.cpp) and picked at run time.
#pragma once

#include <cstdint>

namespace cm_fused {

// Storage dtypes the kernels take (parameters, gradients, m, v: one of them; buffer
// slots: one of them, possibly another). Arithmetic is always fp32.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };

// Everything the update pass needs for one tensor. Pointers are to element 0.
struct UpdateArgs {
  void* p = nullptr;
  const void* g = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  void* v_max = nullptr;  // amsgrad only
  void* slot = nullptr;   // B[j] when this step replaces/fills a slot, else nullptr
  float* sum = nullptr;   // S (always fp32)
  bool first = false;     // count was 0: m <- 0, a <- 0, the slot gets the raw gradient
  bool has_wd = false;
  bool scaled = false;    // divide gradients by grad_scale
  float grad_scale = 1.f;
  float wd_factor = 1.f;  // 1 - lr * weight_decay
  float lerp_w = 0.1f;    // 1 - beta1
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float k_before = 1.f;   // max(count before the insert, 1)
  float step_size = 0.f;  // lr / bc1
  float sqrt_bc2 = 1.f;
  float eps = 1e-8f;
};

// Sum of squares of (g / grad_scale) over [begin, end): fp32 lanes, combined in a fixed
// order into a double. Same bits whatever thread runs it.
using NormFn = double (*)(const void* g, int64_t begin, int64_t end, bool scaled,
                          float grad_scale);
// The update of elements [begin, end) of one tensor.
using UpdateFn = void (*)(const UpdateArgs& a, int64_t begin, int64_t end);

struct KernelTable {
  const char* name;
  NormFn norm[kNumDTypes];                  // by gradient dtype
  UpdateFn update[kNumDTypes][kNumDTypes];  // by [param dtype][slot dtype]
};

namespace DEFAULT {
const KernelTable& kernel_table();
}
namespace AVX2 {
const KernelTable& kernel_table();
}

}  // namespace cm_fused
