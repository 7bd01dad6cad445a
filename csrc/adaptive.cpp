// The adaptive-memory variants' step (ADAM_AM and SGD_AM; cm_fused/reference.py:
// _adaptive_memory): a reduce pass of the two-plane model's sums, a serial decision of
// beta (per tensor for ADAM_AM, one for SGD_AM, from memory[0]'s totals), an update pass.
#include <array>
#include <cfloat>
#include <cmath>

#include "decide.h"
#include "passes.h"

namespace cm_fused {

void adaptive_step(const StepInputs& in) {
  const KernelTable& table = kernels();
  const at::TensorList params = in.params, grads = in.grads, momenta = in.momenta,
                       second_moments = in.second_moments, steps = in.steps,
                       memory = in.memory;
  const std::vector<int>& pdt = in.pdt;
  double* reduced = in.reduced;
  const size_t T = params.size();
  const bool adam = in.variant == kAdamAM;
  const int vi = static_cast<int>(in.variant) - kAdamAM;
  const float lr_f = static_cast<float>(in.lr);
  const float wd_f = static_cast<float>(in.weight_decay);
  const float wd_factor = in.lr_is_f32 ? 1.f - lr_f * wd_f
                                      : static_cast<float>(1.0 - in.lr * in.weight_decay);
  std::vector<UpdateArgs> args(T);
  std::vector<float*> step(T);
  for (size_t i = 0; i < T; ++i) {
    UpdateArgs& a = args[i];
    step[i] = steps[i].data_ptr<float>();
    a.p = params[i].data_ptr();
    a.g = grads[i].data_ptr();
    a.mom = momenta[i].data_ptr();
    a.sq = adam ? second_moments[i].data_ptr() : nullptr;
    set_moment_scales(in, i, &a);
    a.first = *step[i] == 0.f;
    a.has_wd = in.weight_decay != 0.0;
    a.scaled = in.divide;
    a.grad_scale = in.scale;
    a.wd = wd_f;
    a.wd_factor = wd_factor;
    a.lr = lr_f;
    a.beta2 = static_cast<float>(in.beta2);
    a.one_minus_beta2 = static_cast<float>(1.0 - in.beta2);
    a.eps = static_cast<float>(in.eps);
    a.lam = static_cast<float>(in.lam);
    a.one_plus_lam = static_cast<float>(1.0 + in.lam);
    if (adam) {
      const float step_new = *step[i] + 1.f;
      const double bc2 = 1.0 - std::pow(in.beta2, static_cast<double>(step_new));
      a.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
      const float c = 1.f - static_cast<float>(in.beta1) * memory[i].data_ptr<float>()[0];
      a.am_c = c < FLT_MIN ? FLT_MIN : c;  // clamp(min=tiny); NaN stays NaN
    }
  }
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(params, &total);

  // ------------------------------------------------------------ reduce pass
  std::vector<std::array<double, kAMSums>> sums(T);  // per tensor, in chunk order
  float* totals = adam ? nullptr : memory[0].data_ptr<float>();
  if (adam && in.phase == kPhaseUpdate) {  // summed over the processes
    for (size_t i = 0; i < T; ++i) {
      std::copy(reduced + i * kAMSums, reduced + (i + 1) * kAMSums, sums[i].begin());
    }
  } else if (adam || in.phase != kPhaseUpdate) {
    std::vector<std::array<double, kAMSums>> partial(chunks.size());
    for_each_chunk(chunks, total, [&](int64_t c) {
      const Chunk& ch = chunks[c];
      const UpdateArgs& a = args[ch.tensor];
      if (!adam && a.first) return;  // SGD_AM: a fresh tensor adds nothing
      table.am_reduce[vi][pdt[ch.tensor]][eight_bit(in, ch.tensor)](a, ch.begin, ch.end,
                                                                   partial[c].data());
    });
    for (auto& t : sums) t.fill(0.0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      if (!adam && args[chunks[c].tensor].first) continue;
      for (int k = 0; k < kAMSums; ++k) sums[chunks[c].tensor][k] += partial[c][k];
    }
  }

  if (adam && in.phase == kPhaseReduce) {
    for (size_t i = 0; i < T; ++i) {
      std::copy(sums[i].begin(), sums[i].end(), reduced + i * kAMSums);
    }
    return;
  }

  // ------------------------------------------------------------ decide
  if (adam) {
    const double eta = in.lr;
    for (size_t i = 0; i < T; ++i) {
      UpdateArgs& a = args[i];
      float* mem = memory[i].data_ptr<float>();
      const double D = sums[i][0], M = sums[i][1], X = sums[i][2], Y = sums[i][3];
      const double G = eta > 0.0
          ? (1.0 + in.weight_decay * eta) * static_cast<double>(mem[1]) * Y / eta
          : 0.0;
      a.beta = a.first ? static_cast<float>(in.beta1)
                       : clip_ratio(G - M - in.weight_decay * X, D, in.beta1);
      a.one_minus_beta = 1.f - a.beta;
      // Nothing of the update pass reads these.
      mem[0] = mem[0] * a.beta;
      mem[1] = lr_f;
      mem[2] = a.beta;
      *step[i] = *step[i] + 1.f;
      set_rounding(in, i, *step[i], &a);
    }
  } else {
    if (in.phase != kPhaseUpdate) {
      double D = 0.0, N = 0.0;  // over tensors in order, as the reference's fp64 sums
      for (size_t i = 0; i < T; ++i) {
        D += sums[i][0];
        N += sums[i][1];
      }
      if (in.phase == kPhaseReduce) {
        totals[0] = totals[0] + static_cast<float>(D);
        totals[1] = totals[1] + static_cast<float>(N);
        return;
      }
      totals[0] = static_cast<float>(D);
      totals[1] = static_cast<float>(N);
    }
    // From the fp32 totals, as the reference reads them back.
    const float beta = clip_ratio(static_cast<double>(totals[1]),
                                  static_cast<double>(totals[0]), in.beta1);
    totals[2] = beta;
    const float lam_f = static_cast<float>(in.lam), opl = static_cast<float>(1.0 + in.lam);
    const float coef_d = (beta + lam_f) / opl, coef_g = (1.f - beta) / opl;
    for (size_t i = 0; i < T; ++i) {
      args[i].coef_d = coef_d;
      args[i].coef_g = coef_g;
      *step[i] = *step[i] + 1.f;
      set_rounding(in, i, *step[i], &args[i]);
    }
  }

  // ------------------------------------------------------------ update pass
  for_each_chunk(chunks, total, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    table.am_update[vi][pdt[ch.tensor]][eight_bit(in, ch.tensor)](args[ch.tensor], ch.begin,
                                                                  ch.end);
  });
}

}  // namespace cm_fused
