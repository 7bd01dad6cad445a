// The serial decisions of a step, per tensor, shared by the passes: the critical buffer's
// insert rule (docs/SPEC.md), and adaptive memory's clipped ratio.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace cm_fused {

struct Decision {
  int64_t j;         // the slot written, if replace
  bool replace;
  bool first;        // the buffer was empty: the tensor's first step
  int64_t k_before;  // the fill count before the insert, at least 1
};

// The insert rule, shared by every variant: fill while k < C; then replace the first-index
// argmin of the keys when the new key beats it strictly, or on a lucky coin. Writes the
// key (then decays them all), the fill count and the count of inserts.
inline Decision decide(float* K, int64_t C, int64_t* count, int64_t* inserts, float key, bool lucky,
                float key_decay) {
  const int64_t k = *count;
  const bool full = k >= C;
  int64_t j_min = 0;  // torch.argmin: the first minimum; a NaN counts as the minimum
  for (int64_t c = 1; c < C && !std::isnan(K[j_min]); ++c) {
    if (std::isnan(K[c]) || K[c] < K[j_min]) j_min = c;
  }
  const int64_t j = full ? j_min : std::min(k, C - 1);
  const bool replace = !full || key > K[j_min] || lucky;
  if (replace) {
    K[j] = key;
    if (!full) *count = k + 1;
    *inserts = *inserts + 1;
  }
  for (int64_t c = 0; c < C; ++c) K[c] = K[c] * key_decay;
  return {j, replace, k == 0, std::max<int64_t>(k, 1)};
}

// r = num / den, beta = min(r, beta_max) where den > 0 and r > 0, else 0 (NaN too), in
// fp64 and rounded to fp32: the reference's _clip_ratio.
inline float clip_ratio(double num, double den, double beta_max) {
  const double r = num / den;
  return (den > 0.0 && r > 0.0) ? static_cast<float>(std::min(r, beta_max)) : 0.f;
}

}  // namespace cm_fused
