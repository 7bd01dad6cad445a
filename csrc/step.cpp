// cm_fused::step_ for CPU tensors, the op's boundary: every argument checked (a step
// that raises changes nothing), found_inf honoured, the scalars rounded as the passes
// read them (passes.h: StepInputs), then the passes of the variant's step: buffered.cpp
// (the critical buffer: reduce -> decide -> update) or adaptive.cpp (adaptive memory).
// Also the kernel build chosen at run time and the op's registration.
//
// The op's schema is defined in Python from cm_fused.contract.StepArgs (the one
// declaration of the step's inputs); this file only implements it for the CPU dispatch
// key. docs/SPEC.md is the math, for every variant (cm_fused.contract.Variant).
//
// Split steps (phase REDUCE, then UPDATE): a sharded tensor's sums must be summed over
// the processes before anything is decided: REDUCE writes the per-tensor sums into
// `reduced` (fp64 [T, NS]), UPDATE decides from them. (SGD_AM's split is over param
// groups instead: its sums go through memory[0].)
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "passes.h"

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

const KernelTable& kernels() {
  static const KernelTable* table = [] {
#if defined(__x86_64__) || defined(_M_X64)
    // torch's own pick (it honours ATEN_CPU_CAPABILITY), so that the reference's torch ops
    // and the kernels use the same fused multiply-adds (torch.lerp: FMA in torch's AVX2
    // and AVX-512 kernels, none in its portable ones)
    const std::string cap = at::get_cpu_capability();
    // (every set the builds' targets name: a VM may show AVX2 and hide BMI2)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                      __builtin_cpu_supports("bmi2");
    if (cap == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      return &AVX512::kernel_table();
    }
    // (named, not "not DEFAULT": torch 2.7/2.8 call their portable level "NO AVX")
    if ((cap == "AVX2" || cap == "AVX512") && avx2) return &AVX2::kernel_table();
#endif
    return &DEFAULT::kernel_table();
  }();
  return *table;
}

namespace {

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return -1;
  }
}

int slot_dtype_index(at::ScalarType t) { return t == at::kChar ? kI8 : dtype_index(t); }

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

// Which roles and phase this call has: the variant, phase and list lengths checked.
struct Layout {
  bool am;        // adaptive memory: no buffer
  bool exchange;  // a split step's sums go through `reduced`
  bool has_mom, has_sq, has_extra;
  bool defer;     // pending inserts
};

Layout check_layout(const StepInputs& in, const std::optional<at::Tensor>& reduced) {
  const at::TensorList params = in.params, grads = in.grads, momenta = in.momenta,
                       second_moments = in.second_moments, extras = in.extras,
                       buffers = in.buffers, scales = in.scales, keys = in.keys,
                       counts = in.counts, inserts = in.inserts, sums = in.sums,
                       pending = in.pending, steps = in.steps, memory = in.memory;
  const int64_t variant = in.variant, phase = in.phase;
  const size_t T = params.size();
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
    // (no running sum: an empty list; check_tensors checks that the slots are int8)
    if (!sums.empty()) check_list(sums, "sums", T);
    TORCH_CHECK(memory.empty(), "cm_fused::step_: variant ", variant,
                " takes no memory (an empty list)");
  }
  check_list(steps, "steps", T);
  if (!in.moment_scales.empty()) check_list(in.moment_scales, "moment_scales", T);
  // Deferred inserts (StepArgs.pending): AdamCM, fp32 params, a whole step.
  const bool defer = !pending.empty();
  if (defer) {
    TORCH_CHECK(variant == kAdamCM && phase == kPhaseAll, "cm_fused::step_: pending inserts "
                "are AdamCM's, in a whole step (phase 0), got variant ", variant, ", phase ",
                phase);
    check_list(pending, "pending", T);
    // (the insert written next step is the momentum as stored: with 8-bit moments, the
    // codes of the step after the one that decided it)
    TORCH_CHECK(in.moment_scales.empty(), "cm_fused::step_: pending inserts with 8-bit "
                "moments are not supported: moment_scales must be empty");
  }
  return {am, exchange, has_mom, has_sq, has_extra, defer};
}

// Every tensor of every role: device, layout, size and dtype; the dtype indices of the
// params and slots into in->pdt and in->sdt.
void check_tensors(StepInputs* out, const Layout& layout) {
  const StepInputs& in = *out;
  const at::TensorList params = in.params, grads = in.grads, momenta = in.momenta,
                       second_moments = in.second_moments, extras = in.extras,
                       buffers = in.buffers, scales = in.scales, keys = in.keys,
                       counts = in.counts, inserts = in.inserts, sums = in.sums,
                       pending = in.pending, steps = in.steps;
  const size_t T = params.size();
  const bool am = layout.am, has_mom = layout.has_mom, has_sq = layout.has_sq,
             has_extra = layout.has_extra, defer = layout.defer;
  std::vector<int>& pdt = out->pdt;
  std::vector<int>& sdt = out->sdt;
  pdt.assign(T, 0);
  sdt.assign(T, 0);
  for (size_t i = 0; i < T; ++i) {
    const at::Tensor& p = params[i];
    pdt[i] = dtype_index(p.scalar_type());
    TORCH_CHECK(pdt[i] >= 0, "cm_fused::step_: params[", i, "] has dtype ", p.scalar_type(),
                "; the CPU kernel takes float32, bfloat16 or float16");
    const int64_t n = p.numel();
    check_tensor(p, "params", i, n, std::nullopt);
    check_tensor(grads[i], "grads", i, n, p.scalar_type());
    // 8-bit moments: uint8 codes, their scales fp32 [2, blocks] (docs/SPEC.md)
    const bool eight = eight_bit(in, i);
    // (a tensor of no elements has no blocks, hence an empty table, whichever its moments
    // are: its codes pass too; no kernel reads them)
    auto moment_dtype = [&](const at::Tensor& m) {
      return eight || (n == 0 && m.scalar_type() == at::kByte) ? at::kByte : p.scalar_type();
    };
    if (eight) {
      check_tensor(in.moment_scales[i], "moment_scales", i, 2 * ((n + kQBlock - 1) / kQBlock),
                   at::kFloat);
    }
    if (has_mom) check_tensor(momenta[i], "momenta", i, n, moment_dtype(momenta[i]));
    if (has_sq) {
      check_tensor(second_moments[i], "second_moments", i, n, moment_dtype(second_moments[i]));
    }
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
    if (sums.empty()) {
      TORCH_CHECK(sdt[i] == kI8, "cm_fused::step_: sums is empty (no running sum), which "
                  "needs int8 slots; buffers[", i, "] is ", B.scalar_type());
    } else {
      check_tensor(sums[i], "sums", i, n, at::kFloat);
    }
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
}

}  // namespace

void step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta,
              at::TensorList second_moments, at::TensorList extras, at::TensorList buffers,
              at::TensorList scales, at::TensorList moment_scales, at::TensorList keys,
              at::TensorList counts,
              at::TensorList inserts, at::TensorList sums, at::TensorList pending,
              at::TensorList steps, at::TensorList memory, int64_t variant, double lr,
              const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
              double eps, double weight_decay, double dampening, double key_decay,
              double critical_test, double lam, int64_t phase, bool synced, bool maximize,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& rand,
              const std::optional<at::Tensor>& rounding,
              const std::optional<at::Tensor>& reduced) {
  StepInputs in{params, grads, momenta, second_moments, extras, buffers, scales, keys,
                counts, inserts, sums, pending, steps, memory, moment_scales};
  in.variant = variant;
  in.phase = phase;
  const Layout layout = check_layout(in, reduced);
  check_tensors(&in, layout);
  const size_t T = params.size();
  if (rand) {
    TORCH_CHECK(rand->device().is_cpu() && rand->scalar_type() == at::kFloat &&
                    rand->is_contiguous() && rand->numel() >= static_cast<int64_t>(T),
                "cm_fused::step_: rand must be a contiguous float32 CPU tensor with one value "
                "per tensor");
  }
  if (rounding) {
    TORCH_CHECK(rounding->device().is_cpu() && rounding->scalar_type() == at::kLong &&
                    rounding->is_contiguous() && rounding->dim() == 2 &&
                    rounding->size(0) == static_cast<int64_t>(T) && rounding->size(1) == 2,
                "cm_fused::step_: rounding must be a contiguous int64 CPU tensor of shape [",
                T, ", 2], got ", rounding->scalar_type(), " ", rounding->sizes(), " on ",
                rounding->device());
    const int64_t* row = rounding->data_ptr<int64_t>();
    for (size_t i = 0; i < T; ++i) {
      TORCH_CHECK(in.pdt[i] != kF32, "cm_fused::step_: stochastic rounding rounds bfloat16 and "
                  "float16 params, params[", i, "] is float32");
      TORCH_CHECK(row[2 * i] >= 0 && row[2 * i] <= int64_t{0xFFFFFFFF},
                  "cm_fused::step_: rounding[", i, "]'s key must be a uint32 value, got ",
                  row[2 * i]);
      TORCH_CHECK(row[2 * i + 1] >= 0, "cm_fused::step_: rounding[", i,
                  "]'s element offset must be >= 0, got ", row[2 * i + 1]);
    }
  }
  const bool scaled = grad_scale.has_value();
  const double scale_value = scaled ? scalar_value(grad_scale, "grad_scale") : 1.0;
  const bool skip = found_inf.has_value() && scalar_value(found_inf, "found_inf") != 0.0;
  in.lr = lr_tensor ? scalar_value(lr_tensor, "lr_tensor") : lr;
  if (T == 0 || skip) return;  // found_inf: the step changes nothing at all

  in.lr_from_tensor = lr_tensor.has_value();
  in.lr_is_f32 = lr_tensor && lr_tensor->scalar_type() == at::kFloat;
  in.beta1 = beta1;
  in.beta2 = beta2;
  in.eps = eps;
  in.weight_decay = weight_decay;
  in.dampening = dampening;
  in.key_decay = key_decay;
  in.critical_test = critical_test;
  in.lam = lam;
  in.synced = synced;
  // maximize: dividing by -scale is IEEE negation of g / scale (zeros included), and the
  // sum of squares of the norm pass does not see the sign.
  in.divide = scaled || maximize;
  in.scale = static_cast<float>(maximize ? -scale_value : scale_value);
  in.defer = layout.defer;
  in.rand = rand ? rand->data_ptr<float>() : nullptr;
  in.rounding = rounding ? rounding->data_ptr<int64_t>() : nullptr;
  in.reduced = layout.exchange ? reduced->data_ptr<double>() : nullptr;
  if (layout.am) {
    adaptive_step(in);
  } else {
    buffered_step(in);
  }
}

// cm_fused::square_sums: each tensor's sum of squares, fp64 [T], for the fused clip's
// global norm (cm_fused/clipping.py). torch's CPU norm is compute-bound (~9 GB/s on the
// 2-core EPYC we measure on, against the step's 22); this is the step's own norm pass
// (fp32 lanes per chunk, fp64 across chunks), at the bandwidth of the step.
at::Tensor square_sums_cpu(at::TensorList tensors) {
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  std::vector<int> dt;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined() && t.device().is_cpu(), "cm_fused::square_sums: tensors[", i,
                "] must be a defined CPU tensor");
    const int d = dtype_index(t.scalar_type());
    TORCH_CHECK(d >= 0, "cm_fused::square_sums: tensors[", i, "] is ", t.scalar_type(),
                ", expected float32, bfloat16 or float16");
    dense.push_back(t.contiguous());  // (a strided gradient: a copy, as the step makes)
    dt.push_back(d);
  }
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(dense, &total);
  std::vector<double> partial(chunks.size());
  const KernelTable& k = kernels();
  for_each_chunk(chunks, total, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    partial[c] = k.norm[dt[ch.tensor]](dense[ch.tensor].data_ptr(), ch.begin, ch.end, false,
                                       1.0f);
  });
  at::Tensor out = at::zeros({static_cast<int64_t>(dense.size())}, at::kDouble);
  double* sums = out.data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].tensor] += partial[c];
  return out;
}

// Which kernel build runs here ("AVX512", "AVX2" or "DEFAULT"): for tests and benchmarks.
std::string kernel_name() { return kernels().name; }

}  // namespace cm_fused

// The schema of step_ is defined in Python (cm_fused/contract.py); this library adds the
// CPU implementation and a query of the kernel build.
TORCH_LIBRARY_FRAGMENT(cm_fused, m) {
  m.def("cpu_kernel_name() -> str", [] { return cm_fused::kernel_name(); });
  m.def("square_sums(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(cm_fused, CPU, m) {
  m.impl("step_", &cm_fused::step_cpu);
  m.impl("square_sums", &cm_fused::square_sums_cpu);
}
