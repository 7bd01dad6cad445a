// The critical-buffer variants' step (AdamCM, AdamCG, SGDCG, RMSpropCG), after step.cpp's
// checks:
//
//   1. reduce pass (parallel): per fixed-size chunk of every gradient, a sum of squares
//   2. decide (serial, per tensor): reduce the chunk sums in chunk order -> norm -> key
//      (synced: sum of all norms), the insert rule (decide.h), step count, bias corrections
//   3. update pass (parallel): one pass over the tensor's elements (step_kernels.h)
//
// With pending inserts (StepInputs.defer: AdamCM, fp32 params) the order is 3, 1, 2 in
// one pass: each block of the update first writes the insert the previous step left
// pending (its momentum is still the stored one), and the update sums the chunk's
// squared gradient as it goes (UpdateArgs.sum_squares); the decisions come after the
// pass and leave this step's insert pending in turn (a first step fills slot 0 in the
// pass: that much is decided).
//
// Split steps (phase REDUCE, then UPDATE): REDUCE stops after 1 and writes the per-tensor
// sums into `reduced`; UPDATE starts at 2 from them, summed over the processes.
#include <cmath>

#include "decide.h"
#include "passes.h"

namespace cm_fused {
namespace {

// The keys of a step from each tensor's sum of squares.
std::vector<float> keys_from_sums(const std::vector<double>& sumsq, bool synced) {
  const size_t T = sumsq.size();
  std::vector<float> key(T);
  for (size_t i = 0; i < T; ++i) key[i] = static_cast<float>(std::sqrt(sumsq[i]));
  if (synced) {  // SPEC quirk: the sum of per-tensor norms, not the global norm
    double s = 0.0;
    for (size_t i = 0; i < T; ++i) s += key[i];
    std::fill(key.begin(), key.end(), static_cast<float>(s));
  }
  return key;
}

Decision decide_tensor(const StepInputs& in, size_t i, float key) {
  const bool lucky = in.rand != nullptr && in.rand[i] < static_cast<float>(in.critical_test);
  return decide(in.keys[i].data_ptr<float>(), in.keys[i].numel(),
                in.counts[i].data_ptr<int64_t>(), in.inserts[i].data_ptr<int64_t>(), key,
                lucky, static_cast<float>(in.key_decay));
}

void* data_or_null(at::TensorList list, size_t i) {
  return list.empty() ? nullptr : list[i].data_ptr();
}

// What the update pass needs for tensor i, given its decision and its new step count.
UpdateArgs update_args(const StepInputs& in, size_t i, const Decision& d, float step_f) {
  const int64_t n = in.params[i].numel();
  // Scalars rounded as the reference's tensor arithmetic rounds them.
  const float lr_f = static_cast<float>(in.lr);
  const float wd_factor = in.lr_is_f32
      ? 1.f - lr_f * static_cast<float>(in.weight_decay)
      : static_cast<float>(1.0 - in.lr * in.weight_decay);
  // Bias corrections in fp64, as the reference (fp32 1 - beta2^t cancels).
  const double bc1 = 1.0 - std::pow(in.beta1, static_cast<double>(step_f));
  const double bc2 = 1.0 - std::pow(in.beta2, static_cast<double>(step_f));
  const at::Tensor& B = in.buffers[i];
  const int64_t nb = (n + kQBlock - 1) / kQBlock;

  UpdateArgs a;
  a.p = in.params[i].data_ptr();
  a.g = in.grads[i].data_ptr();
  a.mom = data_or_null(in.momenta, i);
  a.sq = data_or_null(in.second_moments, i);
  a.extra = data_or_null(in.extras, i);
  a.slot = d.replace && n > 0
      ? static_cast<char*>(B.data_ptr()) + d.j * n * B.element_size() : nullptr;
  a.slot_scales = a.slot != nullptr && !in.scales.empty()
      ? in.scales[i].data_ptr<float>() + d.j * nb : nullptr;
  const int64_t j_pending = in.defer ? in.pending[i].data_ptr<int64_t>()[0] : -1;
  if (j_pending >= 0 && n > 0) {
    a.flush_slot = static_cast<char*>(B.data_ptr()) + j_pending * n * B.element_size();
    a.flush_scales = in.scales.empty() ? nullptr
                                       : in.scales[i].data_ptr<float>() + j_pending * nb;
  }
  if (in.sums.empty()) {  // no running sum: the update sums the int8 slots
    a.slots = B.data_ptr();
    a.all_scales = in.scales[i].data_ptr<float>();
    a.n_slots = B.size(0);
    a.numel = n;
  } else {
    a.sum = in.sums[i].data_ptr<float>();
  }
  set_moment_scales(in, i, &a);
  a.first = d.first;
  a.has_wd = in.weight_decay != 0.0;
  a.scaled = in.divide;
  a.sum_squares = in.defer;
  a.grad_scale = in.scale;
  a.wd = static_cast<float>(in.weight_decay);
  a.wd_factor = wd_factor;
  a.lr = lr_f;
  a.beta1 = static_cast<float>(in.beta1);
  a.one_minus_beta1 = static_cast<float>(1.0 - in.beta1);
  a.beta2 = static_cast<float>(in.beta2);
  a.one_minus_beta2 = static_cast<float>(1.0 - in.beta2);
  a.one_minus_dampening = static_cast<float>(1.0 - in.dampening);
  a.k_before = static_cast<float>(d.k_before);
  // Python's float / tensor is tensor.reciprocal() * float.
  a.step_size = static_cast<float>(in.lr_from_tensor ? in.lr / bc1 : (1.0 / bc1) * in.lr);
  a.sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
  a.eps = static_cast<float>(in.eps);
  set_rounding(in, i, step_f, &a);
  return a;
}

}  // namespace

void buffered_step(const StepInputs& in) {
  const KernelTable& table = kernels();
  const size_t T = in.params.size();
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(in.params, &total);

  // ------------------------------------------------------------ 1. reduce pass
  std::vector<const void*> gptr(T);
  for (size_t i = 0; i < T; ++i) gptr[i] = in.grads[i].data_ptr();
  std::vector<double> sumsq(T, 0.0);
  std::vector<double> partial(chunks.size());
  if (in.defer) {
    // the norms come out of the update pass (3), the decisions after it
  } else if (in.phase == kPhaseUpdate) {  // summed over the processes
    std::copy(in.reduced, in.reduced + T, sumsq.begin());
  } else {
    for_each_chunk(chunks, total, [&](int64_t c) {
      const Chunk& ch = chunks[c];
      partial[c] = table.norm[in.pdt[ch.tensor]](gptr[ch.tensor], ch.begin, ch.end,
                                                 in.divide, in.scale);
    });
    for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += partial[c];
    if (in.phase == kPhaseReduce) {
      std::copy(sumsq.begin(), sumsq.end(), in.reduced);
      return;
    }
  }

  // ------------------------------------------------------------ 2. decide
  const std::vector<float> key = in.defer ? std::vector<float>()
                                          : keys_from_sums(sumsq, in.synced);
  std::vector<UpdateArgs> args(T);
  for (size_t i = 0; i < T; ++i) {
    // Deferred: the decision comes after the pass; what the pass needs is known before
    // it: the count before the insert and, on a tensor's first step, the fill of slot 0.
    Decision d;
    if (in.defer) {
      const int64_t k = in.counts[i].data_ptr<int64_t>()[0];
      d = {0, k == 0, k == 0, std::max<int64_t>(k, 1)};
    } else {
      d = decide_tensor(in, i, key[i]);
    }
    float* step = in.steps[i].data_ptr<float>();
    const float step_f = *step + 1.f;
    if (!in.defer) *step = step_f;
    args[i] = update_args(in, i, d, step_f);
  }

  // ------------------------------------------------------------ 3. update pass
  std::vector<CMUpdateFn> update(T);
  for (size_t i = 0; i < T; ++i) {
    update[i] = table.update[in.variant][in.pdt[i]][in.sdt[i]][eight_bit(in, i)];
  }
  for_each_chunk(chunks, total, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const double sumsq_chunk = update[ch.tensor](args[ch.tensor], ch.begin, ch.end);
    if (in.defer) partial[c] = sumsq_chunk;  // summed by the update (a.sum_squares)
  });
  if (!in.defer) return;

  // ------------------------------------------------------------ 2'. decide (deferred)
  for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += partial[c];
  const std::vector<float> deferred_key = keys_from_sums(sumsq, in.synced);
  for (size_t i = 0; i < T; ++i) {
    const Decision d = decide_tensor(in, i, deferred_key[i]);
    float* step = in.steps[i].data_ptr<float>();
    *step = *step + 1.f;
    // A first step filled slot 0 in the pass; any other insert is written next step.
    in.pending[i].data_ptr<int64_t>()[0] = d.replace && !d.first ? d.j : -1;
  }
}

}  // namespace cm_fused
