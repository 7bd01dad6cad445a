// What the parallel passes of the CPU step share: the op's arguments once step.cpp has
// checked them (StepInputs), the fixed chunking that makes every sum independent of the
// thread count, and the kernel build chosen at run time. The passes: buffered.cpp
// (the critical-buffer variants), adaptive.cpp (adaptive memory).
//
// Chunk boundaries are fixed (kChunk elements from the start of each tensor) and each
// chunk's partial sum is computed by one thread with the same code, so the norms, the
// keys and hence every insert decision have the same bits whatever the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "step.h"

namespace cm_fused {

constexpr int64_t kChunk = 16384;  // elements; a multiple of every vector block and kQBlock
static_assert(kChunk % kQBlock == 0, "an int8 slot's block must not straddle two chunks");
constexpr int64_t kSerialBelow = 1 << 16;  // total elements under which one thread is faster

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Every tensor cut into kChunk-element chunks from its start; *total: all elements.
inline std::vector<Chunk> make_chunks(at::TensorList params, int64_t* total) {
  std::vector<Chunk> chunks;
  *total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
    }
    *total += n;
  }
  return chunks;
}

// Run body(chunk_index) over all chunks, split into contiguous runs of about equal element
// counts, one per thread. Which thread runs a chunk never changes what it computes.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total, const F& body) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (total < kSerialBelow || threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n; ++c) body(c);
    return;
  }
  // bounds[t] = first chunk of run t; a chunk costs its elements plus a small fixed cost.
  std::vector<int64_t> bounds(threads + 1, n);
  bounds[0] = 0;
  const double per_thread = static_cast<double>(total + 64 * n) / threads;
  double acc = 0;
  int64_t t = 1;
  for (int64_t c = 0; c < n && t < threads; ++c) {
    acc += static_cast<double>(chunks[c].end - chunks[c].begin + 64);
    while (t < threads && acc >= per_thread * t) bounds[t++] = c + 1;
  }
  at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t r = tb; r < te; ++r) {
      for (int64_t c = bounds[r]; c < bounds[r + 1]; ++c) body(c);
    }
  });
}

// The kernels of this CPU's capability (AVX2 or DEFAULT), chosen once (step.cpp).
const KernelTable& kernels();

// The op's arguments after step.cpp's checks: tensor lists (a role a variant does not
// use is an empty list) and the scalars as the passes read them.
struct StepInputs {
  at::TensorList params, grads, momenta, second_moments, extras, buffers, scales, keys,
      counts, inserts, sums, pending, steps, memory, moment_scales;
  int64_t variant;
  int64_t phase;
  double lr;            // lr_tensor's value when given
  bool lr_from_tensor;  // scalars then round as the reference's tensor arithmetic does
  bool lr_is_f32;       // ... and with an fp32 tensor, 1 - lr * wd rounds in fp32
  double beta1;         // also beta1max (ADAM_AM), beta_max (SGD_AM)
  double beta2, eps, weight_decay, dampening, key_decay, critical_test, lam;
  bool synced;
  bool divide;          // divide gradients by scale (GradScaler and/or maximize)
  float scale;          // -scale under maximize
  bool defer;           // pending inserts (AdamCM, fp32 params, a whole step)
  const float* rand;    // critical_test's coins, one per tensor, or nullptr
  const int64_t* rounding;  // stochastic rounding: (key, offset) per tensor, or nullptr
  double* reduced;      // a split step's exchanged sums, fp64 [T, NS], or nullptr
  std::vector<int> pdt;  // the params' DType
  std::vector<int> sdt;  // the slots' DType (buffered variants)
};

// Tensor i's stochastic rounding (if the step has it) for the step that brings its
// count to step_after: the hash's per-step half, mix(key ^ step_after).
inline void set_rounding(const StepInputs& in, size_t i, float step_after, UpdateArgs* a) {
  if (in.rounding == nullptr) return;
  a->round = true;
  const uint32_t step = static_cast<uint32_t>(static_cast<int64_t>(step_after));
  a->round_key = mix(static_cast<uint32_t>(in.rounding[2 * i]) ^ step);
  a->round_offset = static_cast<uint32_t>(in.rounding[2 * i + 1]);
}

// Tensor i's moments are 8-bit codes (an empty moment_scales[i]: full precision); then
// a's scale rows are rows 0 and 1 of moment_scales[i] (nullptr where a role is unused).
inline bool eight_bit(const StepInputs& in, size_t i) {
  return !in.moment_scales.empty() && in.moment_scales[i].numel() > 0;
}

inline void set_moment_scales(const StepInputs& in, size_t i, UpdateArgs* a) {
  if (!eight_bit(in, i)) return;
  const int64_t nb = (in.params[i].numel() + kQBlock - 1) / kQBlock;
  float* rows = in.moment_scales[i].data_ptr<float>();
  a->mom_scales = a->mom ? rows : nullptr;
  a->sq_scales = a->sq ? rows + nb : nullptr;
}

void buffered_step(const StepInputs& in);  // buffered.cpp
void adaptive_step(const StepInputs& in);  // adaptive.cpp

}  // namespace cm_fused
