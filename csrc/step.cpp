// cm_fused::step_ for CPU tensors: the step of docs/SPEC.md (kappa > 0 for the buffered
// variants) over all tensors of one param group, in place, for every variant
// (cm_fused.contract.Variant). The op's
// schema is defined in Python from cm_fused.contract.StepArgs (the one declaration of
// the step's inputs); this file only implements it for the CPU dispatch key.
//
//   1. validate every argument (a step that raises changes nothing); honour found_inf
//   2. reduce pass (parallel): per fixed-size chunk of every gradient, a sum of squares
//   3. decide (serial, per tensor): reduce the chunk sums in chunk order -> norm -> key
//      (synced: sum of all norms), the insert rule (decide(), shared by every variant),
//      step count, bias corrections
//   4. update pass (parallel): one pass over the tensor's elements (step_kernels.h)
//
// With pending inserts (StepArgs.pending: AdamCM, fp32 params) the order is 4, 2, 3 in
// one pass: each block of the update first writes the insert the previous step left
// pending (its momentum is still the stored one), and the update sums the chunk's
// squared gradient as it goes (UpdateArgs.sum_squares); the decisions come after the
// pass and leave this step's insert pending in turn (a first step fills slot 0 in the
// pass: that much is decided).
//
// The adaptive-memory variants (am_step) have the same shape: a reduce pass of the
// two-plane model's sums, a serial decision of beta (per tensor for ADAM_AM, one for
// SGD_AM), an update pass.
//
// Split steps (phase REDUCE, then UPDATE): a sharded tensor's sums must be summed over
// the processes before anything is decided. REDUCE stops after step 2 and writes the
// per-tensor sums into `reduced` (fp64 [T, NS]); UPDATE starts at step 3 from them.
// (SGD_AM's split is over param groups instead: its sums go through memory[0].)
//
// Chunk boundaries are fixed (kChunk elements from the start of each tensor) and each
// chunk's partial sum is computed by one thread with the same code, so the norms, the
// keys and hence every insert decision have the same bits whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "step.h"

// The build passes -DCM_FUSED_TORCH_VERSION=<torch.__version__> unquoted (quotes do not
// survive every build tool's command line), stringized here.
#define CM_FUSED_STR2(x) #x
#define CM_FUSED_STR(x) CM_FUSED_STR2(x)
#ifdef CM_FUSED_TORCH_VERSION
#define CM_FUSED_TORCH_VERSION_STR CM_FUSED_STR(CM_FUSED_TORCH_VERSION)
#else
#define CM_FUSED_TORCH_VERSION_STR "unknown"
#endif

// Read by cm_fused/cpu.py (as bytes, before loading) to refuse a binary built against
// another torch instead of loading it and risking an ABI mismatch.
extern "C" __attribute__((used, visibility("default")))
const char cm_fused_build_tag[] = "CM_FUSED_BUILT_WITH_TORCH=" CM_FUSED_TORCH_VERSION_STR ";";

namespace cm_fused {
namespace {

constexpr int64_t kChunk = 16384;  // elements; a multiple of every vector block and kQBlock
static_assert(kChunk % kQBlock == 0, "an int8 slot's block must not straddle two chunks");
constexpr int64_t kSerialBelow = 1 << 16;  // total elements under which one thread is faster

const KernelTable& kernels() {
  static const KernelTable* table = [] {
#if defined(__x86_64__) || defined(_M_X64)
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    if (cap != "DEFAULT" && cap != "default" && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      return &AVX2::kernel_table();
    }
#endif
    return &DEFAULT::kernel_table();
  }();
  return *table;
}

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return -1;
  }
}

int slot_dtype_index(at::ScalarType t) { return t == at::kChar ? kI8 : dtype_index(t); }

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Every tensor cut into kChunk-element chunks from its start; *total: all elements.
std::vector<Chunk> make_chunks(at::TensorList params, int64_t* total) {
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

void check_list(at::TensorList list, const char* name, size_t count) {
  TORCH_CHECK(list.size() == count, "cm_fused::step_: ", name, " has ", list.size(),
              " tensors, params has ", count);
}

void check_tensor(const at::Tensor& t, const char* name, size_t i, int64_t numel,
                  std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.defined(), "cm_fused::step_: ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), "cm_fused::step_: ", name, "[", i,
              "] is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), "cm_fused::step_: ",
              name, "[", i, "] must be a dense contiguous tensor");
  TORCH_CHECK(t.numel() == numel, "cm_fused::step_: ", name, "[", i, "] has ",
              t.numel(), " elements, expected ", numel);
  if (dtype) {
    TORCH_CHECK(t.scalar_type() == *dtype, "cm_fused::step_: ", name, "[", i,
                "] has dtype ", t.scalar_type(), ", expected ", *dtype);
  }
}

double scalar_value(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(t->numel() == 1, "cm_fused::step_: ", name,
              " must hold exactly one value, got ", t->numel());
  return t->item<double>();
}

// A role list holds one tensor per parameter, or none (unused by this variant/config).
bool check_role(at::TensorList list, const char* name, size_t count, bool required) {
  TORCH_CHECK(list.size() == count || (!required && list.empty()), "cm_fused::step_: ", name,
              " has ", list.size(), " tensors, params has ", count,
              required ? "" : " (an unused role is an empty list)");
  return !list.empty();
}

struct Decision {
  int64_t j;         // the slot written, if replace
  bool replace;
  bool first;        // the buffer was empty: the tensor's first step
  int64_t k_before;  // the fill count before the insert, at least 1
};

// The insert rule, shared by every variant: fill while k < C; then replace the first-index
// argmin of the keys when the new key beats it strictly, or on a lucky coin. Writes the
// key (then decays them all), the fill count and the count of inserts.
Decision decide(float* K, int64_t C, int64_t* count, int64_t* inserts, float key, bool lucky,
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

// The scalars of an adaptive-memory step, validated.
struct AMScalars {
  int64_t variant;
  double lr;         // lr_tensor's value when given
  bool lr_is_f32;    // lr came as an fp32 tensor: 1 - lr * wd rounds in fp32
  double beta1;      // beta1max (ADAM_AM), beta_max (SGD_AM)
  double beta2;
  double eps;
  double weight_decay;
  double lam;
  int64_t phase;
  bool divide;       // divide gradients by scale (GradScaler and/or maximize)
  float scale;
};

// r = num / den, beta = min(r, beta_max) where den > 0 and r > 0, else 0 (NaN too), in
// fp64 and rounded to fp32: the reference's _clip_ratio.
float clip_ratio(double num, double den, double beta_max) {
  const double r = num / den;
  return (den > 0.0 && r > 0.0) ? static_cast<float>(std::min(r, beta_max)) : 0.f;
}

// ADAM_AM and SGD_AM (cm_fused/reference.py: _adaptive_memory), after validation.
void am_step(const KernelTable& table, const AMScalars& s, const std::vector<int>& pdt,
             at::TensorList params, at::TensorList grads, at::TensorList momenta,
             at::TensorList second_moments, at::TensorList steps, at::TensorList memory,
             double* reduced) {
  const size_t T = params.size();
  const bool adam = s.variant == kAdamAM;
  const int vi = static_cast<int>(s.variant) - kAdamAM;
  const float lr_f = static_cast<float>(s.lr);
  const float wd_f = static_cast<float>(s.weight_decay);
  const float wd_factor = s.lr_is_f32 ? 1.f - lr_f * wd_f
                                      : static_cast<float>(1.0 - s.lr * s.weight_decay);
  std::vector<UpdateArgs> args(T);
  std::vector<float*> step(T);
  for (size_t i = 0; i < T; ++i) {
    UpdateArgs& a = args[i];
    step[i] = steps[i].data_ptr<float>();
    a.p = params[i].data_ptr();
    a.g = grads[i].data_ptr();
    a.mom = momenta[i].data_ptr();
    a.sq = adam ? second_moments[i].data_ptr() : nullptr;
    a.first = *step[i] == 0.f;
    a.has_wd = s.weight_decay != 0.0;
    a.scaled = s.divide;
    a.grad_scale = s.scale;
    a.wd = wd_f;
    a.wd_factor = wd_factor;
    a.lr = lr_f;
    a.beta2 = static_cast<float>(s.beta2);
    a.one_minus_beta2 = static_cast<float>(1.0 - s.beta2);
    a.eps = static_cast<float>(s.eps);
    a.lam = static_cast<float>(s.lam);
    a.one_plus_lam = static_cast<float>(1.0 + s.lam);
    if (adam) {
      const float step_new = *step[i] + 1.f;
      const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(step_new));
      a.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
      const float c = 1.f - static_cast<float>(s.beta1) * memory[i].data_ptr<float>()[0];
      a.am_c = c < FLT_MIN ? FLT_MIN : c;  // clamp(min=tiny); NaN stays NaN
    }
  }
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(params, &total);

  // ------------------------------------------------------------ reduce pass
  std::vector<std::array<double, kAMSums>> sums(T);  // per tensor, in chunk order
  float* totals = adam ? nullptr : memory[0].data_ptr<float>();
  if (adam && s.phase == kPhaseUpdate) {  // summed over the processes
    for (size_t i = 0; i < T; ++i) {
      std::copy(reduced + i * kAMSums, reduced + (i + 1) * kAMSums, sums[i].begin());
    }
  } else if (adam || s.phase != kPhaseUpdate) {
    std::vector<std::array<double, kAMSums>> partial(chunks.size());
    for_each_chunk(chunks, total, [&](int64_t c) {
      const Chunk& ch = chunks[c];
      const UpdateArgs& a = args[ch.tensor];
      if (!adam && a.first) return;  // SGD_AM: a fresh tensor adds nothing
      table.am_reduce[vi][pdt[ch.tensor]](a, ch.begin, ch.end, partial[c].data());
    });
    for (auto& t : sums) t.fill(0.0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      if (!adam && args[chunks[c].tensor].first) continue;
      for (int k = 0; k < kAMSums; ++k) sums[chunks[c].tensor][k] += partial[c][k];
    }
  }

  if (adam && s.phase == kPhaseReduce) {
    for (size_t i = 0; i < T; ++i) {
      std::copy(sums[i].begin(), sums[i].end(), reduced + i * kAMSums);
    }
    return;
  }

  // ------------------------------------------------------------ decide
  if (adam) {
    const double eta = s.lr;
    for (size_t i = 0; i < T; ++i) {
      UpdateArgs& a = args[i];
      float* mem = memory[i].data_ptr<float>();
      const double D = sums[i][0], M = sums[i][1], X = sums[i][2], Y = sums[i][3];
      const double G = eta > 0.0
          ? (1.0 + s.weight_decay * eta) * static_cast<double>(mem[1]) * Y / eta
          : 0.0;
      a.beta = a.first ? static_cast<float>(s.beta1)
                       : clip_ratio(G - M - s.weight_decay * X, D, s.beta1);
      a.one_minus_beta = 1.f - a.beta;
      // Nothing of the update pass reads these.
      mem[0] = mem[0] * a.beta;
      mem[1] = lr_f;
      mem[2] = a.beta;
      *step[i] = *step[i] + 1.f;
    }
  } else {
    if (s.phase != kPhaseUpdate) {
      double D = 0.0, N = 0.0;  // over tensors in order, as the reference's fp64 sums
      for (size_t i = 0; i < T; ++i) {
        D += sums[i][0];
        N += sums[i][1];
      }
      if (s.phase == kPhaseReduce) {
        totals[0] = totals[0] + static_cast<float>(D);
        totals[1] = totals[1] + static_cast<float>(N);
        return;
      }
      totals[0] = static_cast<float>(D);
      totals[1] = static_cast<float>(N);
    }
    // From the fp32 totals, as the reference reads them back.
    const float beta = clip_ratio(static_cast<double>(totals[1]),
                                  static_cast<double>(totals[0]), s.beta1);
    totals[2] = beta;
    const float lam_f = static_cast<float>(s.lam), opl = static_cast<float>(1.0 + s.lam);
    const float coef_d = (beta + lam_f) / opl, coef_g = (1.f - beta) / opl;
    for (size_t i = 0; i < T; ++i) {
      args[i].coef_d = coef_d;
      args[i].coef_g = coef_g;
      *step[i] = *step[i] + 1.f;
    }
  }

  // ------------------------------------------------------------ update pass
  for_each_chunk(chunks, total, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    table.am_update[vi][pdt[ch.tensor]](args[ch.tensor], ch.begin, ch.end);
  });
}

void step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta,
              at::TensorList second_moments, at::TensorList extras, at::TensorList buffers,
              at::TensorList scales, at::TensorList keys, at::TensorList counts,
              at::TensorList inserts, at::TensorList sums, at::TensorList pending,
              at::TensorList steps, at::TensorList memory, int64_t variant, double lr,
              const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
              double eps, double weight_decay, double dampening, double key_decay,
              double critical_test, double lam, int64_t phase, bool synced, bool maximize,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& rand,
              const std::optional<at::Tensor>& reduced) {
  const size_t T = params.size();
  // ------------------------------------------------------------ 1. validate
  TORCH_CHECK(variant >= 0 && variant < kNumVariants, "cm_fused::step_: unknown variant ",
              variant);
  const bool am = variant >= kNumBuffered;  // adaptive memory: no buffer
  const bool adam = variant == kAdamCM || variant == kAdamCG || variant == kAdamAM;
  const bool sgd = variant == kSGDCG || variant == kSGDAM;
  TORCH_CHECK(phase >= kPhaseAll && phase <= kPhaseUpdate, "cm_fused::step_: unknown phase ",
              phase);
  // Every split step but SGD_AM's hands its sums over in `reduced`: fp64 [T, NS].
  const bool exchange = phase != kPhaseAll && variant != kSGDAM;
  const int64_t ns = variant == kAdamAM ? kAMSums : 1;
  TORCH_CHECK(reduced.has_value() == exchange, "cm_fused::step_: reduced must be given ",
              exchange ? "for" : "only for", " the REDUCE and UPDATE phases of variants other "
              "than SGD_AM");
  if (exchange) {
    TORCH_CHECK(reduced->device().is_cpu() && reduced->scalar_type() == at::kDouble &&
                    reduced->is_contiguous() && reduced->dim() == 2 &&
                    reduced->size(0) == static_cast<int64_t>(params.size()) &&
                    reduced->size(1) == ns,
                "cm_fused::step_: reduced must be a contiguous float64 CPU tensor of shape [",
                params.size(), ", ", ns, "], got ", reduced->scalar_type(), " ",
                reduced->sizes(), " on ", reduced->device());
  }
  check_list(grads, "grads", T);
  const bool has_mom = check_role(momenta, "momenta", T, adam || am);
  const bool has_sq = check_role(second_moments, "second_moments", T, !sgd);
  const bool has_extra = check_role(extras, "extras", T, false);
  TORCH_CHECK(!sgd || (!has_sq && !has_extra), "cm_fused::step_: variant ", variant,
              " takes no second_moments or extras");
  TORCH_CHECK(!am || !has_extra, "cm_fused::step_: variant ", variant, " takes no extras");
  if (am) {
    TORCH_CHECK(buffers.empty() && scales.empty() && keys.empty() && counts.empty() &&
                    inserts.empty() && sums.empty() && pending.empty(),
                "cm_fused::step_: variant ", variant, " keeps no buffer: buffers, scales, keys, "
                "counts, inserts, sums and pending must be empty lists");
    TORCH_CHECK(memory.size() == (variant == kAdamAM ? T : 1), "cm_fused::step_: memory has ",
                memory.size(), " tensors, expected ",
                variant == kAdamAM ? "one per parameter" : "exactly one");
    for (size_t i = 0; i < memory.size(); ++i) {
      check_tensor(memory[i], "memory", i, 3, at::kFloat);
    }
  } else {
    check_list(buffers, "buffers", T);
    check_list(keys, "keys", T);
    check_list(counts, "counts", T);
    check_list(inserts, "inserts", T);
    check_list(sums, "sums", T);
    TORCH_CHECK(memory.empty(), "cm_fused::step_: variant ", variant,
                " takes no memory (an empty list)");
  }
  check_list(steps, "steps", T);
  // Deferred inserts (StepArgs.pending): AdamCM, fp32 params, a whole step.
  const bool defer = !pending.empty();
  if (defer) {
    TORCH_CHECK(variant == kAdamCM && phase == kPhaseAll, "cm_fused::step_: pending inserts "
                "are AdamCM's, in a whole step (phase 0), got variant ", variant, ", phase ",
                phase);
    check_list(pending, "pending", T);
  }
  std::vector<int> pdt(T), sdt(T);
  for (size_t i = 0; i < T; ++i) {
    const at::Tensor& p = params[i];
    pdt[i] = dtype_index(p.scalar_type());
    TORCH_CHECK(pdt[i] >= 0, "cm_fused::step_: params[", i, "] has dtype ", p.scalar_type(),
                "; the CPU kernel takes float32, bfloat16 or float16");
    const int64_t n = p.numel();
    check_tensor(p, "params", i, n, std::nullopt);
    check_tensor(grads[i], "grads", i, n, p.scalar_type());
    if (has_mom) check_tensor(momenta[i], "momenta", i, n, p.scalar_type());
    if (has_sq) check_tensor(second_moments[i], "second_moments", i, n, p.scalar_type());
    if (has_extra) check_tensor(extras[i], "extras", i, n, p.scalar_type());
    check_tensor(steps[i], "steps", i, 1, at::kFloat);
    if (am) continue;
    const int64_t C = keys[i].numel();
    TORCH_CHECK(C >= 1, "cm_fused::step_: keys[", i, "] is empty");
    check_tensor(keys[i], "keys", i, C, at::kFloat);
    const at::Tensor& B = buffers[i];
    TORCH_CHECK(B.dim() >= 1 && B.size(0) == C, "cm_fused::step_: buffers[", i,
                "] must have ", C, " slots along dim 0 (one per key), got shape ", B.sizes());
    sdt[i] = slot_dtype_index(B.scalar_type());
    TORCH_CHECK(sdt[i] >= 0, "cm_fused::step_: buffers[", i, "] has dtype ", B.scalar_type(),
                "; slots must be float32, bfloat16, float16 or int8");
    check_tensor(B, "buffers", i, C * n, std::nullopt);
    // int8 slots, and only they, come with their scales: fp32 [C, blocks of the slot].
    TORCH_CHECK((sdt[i] == kI8) == !scales.empty(), "cm_fused::step_: buffers[", i,
                "] is ", B.scalar_type(), " but scales ",
                scales.empty() ? "is empty (int8 slots need them)" : "is given (int8 slots only)");
    if (sdt[i] == kI8) {
      check_list(scales, "scales", T);
      check_tensor(scales[i], "scales", i, C * ((n + kQBlock - 1) / kQBlock), at::kFloat);
    }
    check_tensor(sums[i], "sums", i, n, at::kFloat);
    check_tensor(counts[i], "counts", i, 1, at::kLong);
    check_tensor(inserts[i], "inserts", i, 1, at::kLong);
    if (defer) {
      check_tensor(pending[i], "pending", i, 1, at::kLong);
      TORCH_CHECK(pdt[i] == kF32, "cm_fused::step_: pending inserts need float32 params (the "
                  "momentum as stored is the value inserted), params[", i, "] is ",
                  p.scalar_type());
      const int64_t j = pending[i].data_ptr<int64_t>()[0];
      const int64_t k = counts[i].data_ptr<int64_t>()[0];
      TORCH_CHECK(j >= -1 && j < C && (j == -1 || k > 0), "cm_fused::step_: pending[", i,
                  "] = ", j, " is not a slot of a buffer holding ", k, " of ", C);
    }
  }
  if (rand) {
    TORCH_CHECK(rand->device().is_cpu() && rand->scalar_type() == at::kFloat &&
                    rand->is_contiguous() && rand->numel() >= static_cast<int64_t>(T),
                "cm_fused::step_: rand must be a contiguous float32 CPU tensor with one value "
                "per tensor");
  }
  const bool scaled = grad_scale.has_value();
  const double scale_value = scaled ? scalar_value(grad_scale, "grad_scale") : 1.0;
  const bool skip = found_inf.has_value() && scalar_value(found_inf, "found_inf") != 0.0;
  const double lr_value = lr_tensor ? scalar_value(lr_tensor, "lr_tensor") : lr;
  if (T == 0 || skip) return;  // found_inf: the step changes nothing at all

  const KernelTable& table = kernels();
  // maximize: dividing by -scale is IEEE negation of g / scale (zeros included), and the
  // sum of squares of the norm pass does not see the sign.
  const bool divide = scaled || maximize;
  const float scale_f = static_cast<float>(maximize ? -scale_value : scale_value);
  if (am) {
    const AMScalars s{variant, lr_value, lr_tensor && lr_tensor->scalar_type() == at::kFloat,
                      beta1, beta2, eps, weight_decay, lam, phase, divide, scale_f};
    am_step(table, s, pdt, params, grads, momenta, second_moments, steps, memory,
            exchange ? reduced->data_ptr<double>() : nullptr);
    return;
  }

  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(params, &total);

  // ------------------------------------------------------------ 2. reduce pass
  std::vector<const void*> gptr(T);
  for (size_t i = 0; i < T; ++i) gptr[i] = grads[i].data_ptr();
  std::vector<double> sumsq(T, 0.0);
  std::vector<double> partial(chunks.size());
  if (defer) {
    // the norms come out of the update pass (step 4), the decisions after it
  } else if (phase == kPhaseUpdate) {  // summed over the processes
    std::copy(reduced->data_ptr<double>(), reduced->data_ptr<double>() + T, sumsq.begin());
  } else {
    for_each_chunk(chunks, total, [&](int64_t c) {
      const Chunk& ch = chunks[c];
      partial[c] = table.norm[pdt[ch.tensor]](gptr[ch.tensor], ch.begin, ch.end, divide,
                                              scale_f);
    });
    for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += partial[c];
    if (phase == kPhaseReduce) {
      std::copy(sumsq.begin(), sumsq.end(), reduced->data_ptr<double>());
      return;
    }
  }

  // ------------------------------------------------------------ 3. decide
  auto keys_from_sums = [&] {
    std::vector<float> key(T);
    for (size_t i = 0; i < T; ++i) key[i] = static_cast<float>(std::sqrt(sumsq[i]));
    if (synced) {  // SPEC quirk: the sum of per-tensor norms, not the global norm
      double s = 0.0;
      for (size_t i = 0; i < T; ++i) s += key[i];
      std::fill(key.begin(), key.end(), static_cast<float>(s));
    }
    return key;
  };

  // Scalars rounded as the reference's tensor arithmetic rounds them.
  const at::ScalarType lr_dtype = lr_tensor ? lr_tensor->scalar_type() : at::kDouble;
  const bool lr_is_f32 = lr_tensor && lr_dtype == at::kFloat;
  const float lr_f = static_cast<float>(lr_value);
  const float wd_factor = lr_is_f32
      ? 1.f - lr_f * static_cast<float>(weight_decay)
      : static_cast<float>(1.0 - lr_value * weight_decay);
  const float key_decay_f = static_cast<float>(key_decay);
  const float critical_f = static_cast<float>(critical_test);
  const float* rand_ptr = rand ? rand->data_ptr<float>() : nullptr;
  auto ptr = [](at::TensorList list, size_t i) {
    return list.empty() ? nullptr : list[i].data_ptr();
  };

  auto decide_one = [&](size_t i, float key) {
    const bool lucky = rand_ptr != nullptr && rand_ptr[i] < critical_f;
    return decide(keys[i].data_ptr<float>(), keys[i].numel(), counts[i].data_ptr<int64_t>(),
                  inserts[i].data_ptr<int64_t>(), key, lucky, key_decay_f);
  };
  std::vector<float> key = defer ? std::vector<float>() : keys_from_sums();
  std::vector<UpdateArgs> args(T);
  for (size_t i = 0; i < T; ++i) {
    const int64_t n = params[i].numel();
    // Deferred: the decision comes after the pass; what the pass needs is known before
    // it: the count before the insert and, on a tensor's first step, the fill of slot 0.
    Decision d;
    if (defer) {
      const int64_t k = counts[i].data_ptr<int64_t>()[0];
      d = {0, k == 0, k == 0, std::max<int64_t>(k, 1)};
    } else {
      d = decide_one(i, key[i]);
    }
    float* step = steps[i].data_ptr<float>();
    const float step_f = *step + 1.f;
    if (!defer) *step = step_f;
    // Bias corrections in fp64, as the reference (fp32 1 - beta2^t cancels).
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step_f));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step_f));

    UpdateArgs& a = args[i];
    a.p = params[i].data_ptr();
    a.g = gptr[i];
    a.mom = ptr(momenta, i);
    a.sq = ptr(second_moments, i);
    a.extra = ptr(extras, i);
    a.slot = d.replace && n > 0
        ? static_cast<char*>(buffers[i].data_ptr()) + d.j * n * buffers[i].element_size()
        : nullptr;
    const int64_t nb = (n + kQBlock - 1) / kQBlock;
    a.slot_scales = a.slot != nullptr && !scales.empty()
        ? scales[i].data_ptr<float>() + d.j * nb : nullptr;
    const int64_t j_pending = defer ? pending[i].data_ptr<int64_t>()[0] : -1;
    if (j_pending >= 0 && n > 0) {
      a.flush_slot =
          static_cast<char*>(buffers[i].data_ptr()) + j_pending * n * buffers[i].element_size();
      a.flush_scales = scales.empty() ? nullptr : scales[i].data_ptr<float>() + j_pending * nb;
    }
    a.sum = sums[i].data_ptr<float>();
    a.first = d.first;
    a.has_wd = weight_decay != 0.0;
    a.scaled = divide;
    a.sum_squares = defer;
    a.grad_scale = scale_f;
    a.wd = static_cast<float>(weight_decay);
    a.wd_factor = wd_factor;
    a.lr = lr_f;
    a.beta1 = static_cast<float>(beta1);
    a.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    a.beta2 = static_cast<float>(beta2);
    a.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    a.one_minus_dampening = static_cast<float>(1.0 - dampening);
    a.k_before = static_cast<float>(d.k_before);
    // Python's float / tensor is tensor.reciprocal() * float.
    a.step_size = static_cast<float>(lr_tensor ? lr_value / bc1 : (1.0 / bc1) * lr_value);
    a.sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
    a.eps = static_cast<float>(eps);
  }

  // ------------------------------------------------------------ 4. update pass
  std::vector<CMUpdateFn> update(T);
  for (size_t i = 0; i < T; ++i) update[i] = table.update[variant][pdt[i]][sdt[i]];
  for_each_chunk(chunks, total, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const double sumsq_chunk = update[ch.tensor](args[ch.tensor], ch.begin, ch.end);
    if (defer) partial[c] = sumsq_chunk;  // summed by the update (a.sum_squares)
  });
  if (!defer) return;

  // ------------------------------------------------------------ 5. decide (deferred)
  for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += partial[c];
  key = keys_from_sums();
  for (size_t i = 0; i < T; ++i) {
    const Decision d = decide_one(i, key[i]);
    float* step = steps[i].data_ptr<float>();
    *step = *step + 1.f;
    // A first step filled slot 0 in the pass; any other insert is written next step.
    pending[i].data_ptr<int64_t>()[0] = d.replace && !d.first ? d.j : -1;
  }
}

}  // namespace

// Which kernel build runs here ("AVX2" or "DEFAULT"): for tests and benchmarks.
std::string kernel_name() { return kernels().name; }

}  // namespace cm_fused

// The schema of step_ is defined in Python (cm_fused/contract.py); this library adds the
// CPU implementation and a query of the kernel build.
TORCH_LIBRARY_FRAGMENT(cm_fused, m) {
  m.def("cpu_kernel_name() -> str", [] { return cm_fused::kernel_name(); });
}

TORCH_LIBRARY_IMPL(cm_fused, CPU, m) { m.impl("step_", &cm_fused::step_cpu); }
