// The vectorised per-chunk kernels of the fused step, written once as templates over the
// variant V (cm_fused.contract.Variant), the parameter dtype T and the slot dtype TS
// (fp32, bf16, fp16; arithmetic always fp32).
//
// This header is compiled once per CPU capability: the including .cpp defines
// CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including it, so everything here, at::vec
// included, lands in a namespace of its own (see PyTorch's Note [CPU_CAPABILITY
// namespace]) and the builds never share a symbol. A vector holds 8 fp32 lanes, 16 with
// AVX-512: the AVX2 and AVX-512 builds give the same bits per element (the portable one
// differs where at::vec's fmadd is fused on x86 and not there, as torch's own builds do);
// sums over a tensor (the norms, adaptive memory's sums) are added in another order.
//
// Operation order mirrors cm_fused/reference.py, so the backends agree to rounding.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "step.h"

namespace cm_fused {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kW = 2 * kV;  // elements per block: two fp32 vectors, one 16-bit vector

// Load/store kW elements of T as two fp32 vectors.
template <typename T>
struct IO {  // bf16, fp16
  static_assert(Vectorized<T>::size() == kW, "a 16-bit vector holds two fp32 vectors");
  static inline void load(const T* ptr, Vec& lo, Vec& hi) {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr));
  }
  static inline void store(T* ptr, const Vec& lo, const Vec& hi) {
    at::vec::convert_from_float<T>(lo, hi).store(ptr);
  }
  // Store, and return in lo/hi the values as stored (rounded to T).
  static inline void store_rounded(T* ptr, Vec& lo, Vec& hi) {
    auto narrow = at::vec::convert_from_float<T>(lo, hi);
    narrow.store(ptr);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(narrow);
  }
};

template <>
struct IO<float> {
  static inline void load(const float* ptr, Vec& lo, Vec& hi) {
    lo = Vec::loadu(ptr);
    hi = Vec::loadu(ptr + kV);
  }
  static inline void store(float* ptr, const Vec& lo, const Vec& hi) {
    lo.store(ptr);
    hi.store(ptr + kV);
  }
  static inline void store_rounded(float* ptr, Vec& lo, Vec& hi) { store(ptr, lo, hi); }
};

// torch.lerp's vectorised formula (ATen/native/Lerp.h), as the reference's m.lerp(g, w).
inline Vec lerp(const Vec& start, const Vec& end, float w) {
  if (std::abs(w) < 0.5f) {
    return at::vec::fmadd(Vec(w), end - start, start);
  }
  return at::vec::fmadd(Vec(w - 1.f), end - start, end);
}

// Software prefetch, kAhead elements ahead in every stream a pass reads. The hardware
// prefetchers alone left the passes stalled on loads at well under the machine's
// bandwidth (AdamAM on gpt2-11m, 2 threads: 16.4 ms a step without, 11.8 ms with).
// A prefetch never faults, so running past a tensor's end is harmless.
constexpr int64_t kAhead = 1024;

// Unconditional, in integer arithmetic (an unused role's stream is null: a branch per
// stream and block cost most of the gain, and a prefetch of any address is harmless).
// Every cache line a block of kW elements spans (two of fp32 with AVX-512's 16 lanes: one
// prefetch per block left half the lines to the hardware, and the in-memory step 20% slower).
template <typename T>
inline void prefetch_one(const T* stream, int64_t i) {
  constexpr int64_t kLine = 64;
  constexpr int64_t kLines = std::max<int64_t>(1, kW * int64_t(sizeof(T)) / kLine);
  const uintptr_t at = reinterpret_cast<uintptr_t>(stream) + (i + kAhead) * sizeof(T);
  for (int64_t l = 0; l < kLines; ++l) {
    __builtin_prefetch(reinterpret_cast<const void*>(at + l * kLine));
  }
}

template <typename... T>
inline void prefetch_ahead(int64_t i, const T*... streams) {
  (prefetch_one(streams, i), ...);
}

// ---------------------------------------------------------------- norm pass

template <typename T>
inline void sq_block(const T* g, bool scaled, const Vec& scale, Vec& acc_lo, Vec& acc_hi) {
  Vec lo, hi;
  IO<T>::load(g, lo, hi);
  if (scaled) {
    lo = lo / scale;
    hi = hi / scale;
  }
  acc_lo = at::vec::fmadd(lo, lo, acc_lo);
  acc_hi = at::vec::fmadd(hi, hi, acc_hi);
}

// A chunk's sum of squares as norm_kernel sums it: blocks numbered from the chunk's
// start, the even-numbered ones and the zero-padded tail into a0/a1, the odd-numbered
// ones into b0/b1. The update pass of a step that defers its inserts sums the same way
// (update_range), so the keys have the same bits either way (tests/test_cpu.py).
struct SumSq {
  Vec a0{0.f}, a1{0.f}, b0{0.f}, b1{0.f};
  // (the int8 paths sum per kQBlock elements: each call must start on an even block)
  static_assert(kQBlock % (2 * kW) == 0, "a quantization block holds pairs of blocks");
  double total() const {
    float lanes[kW];
    (a0 + b0).store(lanes);
    (a1 + b1).store(lanes + kV);
    double sum = 0.0;
    for (int64_t l = 0; l < kW; ++l) sum += lanes[l];
    return sum;
  }
};

template <typename T>
double norm_kernel(const void* g_, int64_t begin, int64_t end, bool scaled, float grad_scale) {
  const T* g = static_cast<const T*>(g_);
  const Vec scale(grad_scale);
  SumSq s;
  int64_t i = begin;
  // (no software prefetch: on one stream the hardware's does better; square_sums over
  // gpt2-11m's gradients took 3.2 ms with prefetch_ahead here, 2.1-2.3 ms without)
  for (; i + 2 * kW <= end; i += 2 * kW) {
    sq_block<T>(g + i, scaled, scale, s.a0, s.a1);
    sq_block<T>(g + i + kW, scaled, scale, s.b0, s.b1);
  }
  for (; i + kW <= end; i += kW) {
    sq_block<T>(g + i, scaled, scale, s.a0, s.a1);
  }
  if (i < end) {  // zero padding adds nothing to a sum of squares
    T pad[kW];
    std::memset(static_cast<void*>(pad), 0, sizeof(pad));
    std::memcpy(static_cast<void*>(pad), g + i, (end - i) * sizeof(T));
    sq_block<T>(pad, scaled, scale, s.a0, s.a1);
  }
  return s.total();
}

// ---------------------------------------------------------------- stochastic rounding

// The store of kW new param values x (cm_fused/rounding.py: stochastic_round): y, x
// rounded to nearest, or n, y's neighbour on x's side, where u < |x - y| / |n - y|. A
// 16-bit float is sign and magnitude: one step up of its pattern is the neighbour
// farther from 0, one step down the nearer, whatever the sign. The reference's other
// conditions need no test: where they keep y (x == y, a NaN x, an infinite y) the ratio
// is 0 or NaN (inf / inf; there n may differ from the reference's), which u >= 0 never
// passes. y and n convert back to their own bits (a NaN to those the plain store
// writes). e: x0's element index in the tensor (the padded tail block draws past the
// tensor's end: those lanes are not copied back).
template <typename T>
inline void store_stochastic(const UpdateArgs& a, T* p, int64_t e, const Vec& x0,
                             const Vec& x1) {
  const Vectorized<T> y = at::vec::convert_from_float<T>(x0, x1);
  Vec y0, y1;
  std::tie(y0, y1) = at::vec::convert_to_float<T>(y);
  uint16_t bits[kW], up[kW], down[kW];
  float u[kW];
  y.store(bits);
  // Plain loops over fixed-size arrays, which the compiler vectorises (unsigned
  // arithmetic wraps, as the hash needs: at::vec has no unsigned 32-bit vector).
  const uint32_t base = a.round_offset + static_cast<uint32_t>(e);
  for (int64_t l = 0; l < kW; ++l) {
    up[l] = static_cast<uint16_t>(bits[l] + 1u);
    down[l] = static_cast<uint16_t>(bits[l] - 1u);
    const uint32_t r = mix(a.round_key ^ (base + static_cast<uint32_t>(l)));
    // (r >> 8 < 2^24: exact in fp32, and a signed conversion vectorises)
    u[l] = static_cast<float>(static_cast<int32_t>(r >> 8)) * 0x1p-24f;
  }
  Vec a0, a1, b0, b1;
  std::tie(a0, a1) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(up));
  std::tie(b0, b1) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(down));
  // n: up where up and x lie on the same side of y, else down
  const Vec n0 = Vec::blendv(a0, b0, (x0 > y0) ^ (a0 > y0));
  const Vec n1 = Vec::blendv(a1, b1, (x1 > y1) ^ (a1 > y1));
  const Vec take0 = Vec::loadu(u) < (x0 - y0).abs() / (n0 - y0).abs();
  const Vec take1 = Vec::loadu(u + kV) < (x1 - y1).abs() / (n1 - y1).abs();
  IO<T>::store(p, Vec::blendv(y0, n0, take0), Vec::blendv(y1, n1, take1));
}

// The store of the new param values: rounded to nearest, or SR: stochastically.
template <typename T, bool SR>
inline void store_param(const UpdateArgs& a, T* p, int64_t e, const Vec& x0, const Vec& x1) {
  if constexpr (SR) {
    store_stochastic<T>(a, p, e, x0, x1);
  } else {
    IO<T>::store(p, x0, x1);
  }
}

// ---------------------------------------------------------------- update pass

// g / grad_scale (by -grad_scale with maximize: see step.cpp), as the update passes read it.
template <typename T>
inline void load_gradient(const UpdateArgs& a, const T* g, Vec& g0, Vec& g1) {
  IO<T>::load(g, g0, g1);
  if (a.scaled) {
    const Vec scale(a.grad_scale);
    g0 = g0 / scale;
    g1 = g1 / scale;
  }
}

// sq <- beta2 * sq + (1 - beta2) * u^2 (Adam's v, RMSprop's square average), stored; the
// new values are returned in q0, q1.
// second_moment without the store (adaptive memory's reduce pass must not write v).
template <typename T>
inline void second_moment_value(const UpdateArgs& a, const T* sq, const Vec& u0,
                                const Vec& u1, Vec& q0, Vec& q1) {
  IO<T>::load(sq, q0, q1);
  const Vec b2(a.beta2), omb2(a.one_minus_beta2);
  q0 = q0 * b2 + (omb2 * u0) * u0;
  q1 = q1 * b2 + (omb2 * u1) * u1;
}

template <typename T>
inline void second_moment(const UpdateArgs& a, T* sq, const Vec& u0, const Vec& u1, Vec& q0,
                          Vec& q1) {
  second_moment_value<T>(a, sq, u0, u1, q0, q1);
  IO<T>::store(sq, q0, q1);
}

// The insert into a floating-point slot, one block of kW elements: S <- (S - B[j]) +
// round(new), B[j] <- round(new). s0, s1: S as loaded.
template <typename TS>
inline void insert_block(TS* slot, float* sum, const Vec& s0, const Vec& s1, Vec n0,
                         Vec n1) {
  Vec b0, b1;
  IO<TS>::load(slot, b0, b1);
  IO<TS>::store_rounded(slot, n0, n1);
  IO<float>::store(sum, (s0 - b0) + n0, (s1 - b1) + n1);
}

// A deferred insert into a floating-point slot, one block of kW elements: the fp32
// momentum as stored goes in, as the step that decided it would have written it.
template <typename TS>
inline void flush_insert(const float* m, TS* slot, float* sum) {
  Vec m0, m1, s0, s1;
  IO<float>::load(m, m0, m1);
  IO<float>::load(sum, s0, s1);
  insert_block<TS>(slot, sum, s0, s1, m0, m1);
}

// The roots of a block's new second moments, where the 8-bit encoder takes them
// (a.root: staged 8-bit second moments; e: the block's index in the staged range).
inline void store_root(const UpdateArgs& a, int64_t e, const Vec& r0, const Vec& r1) {
  if (a.root != nullptr) {
    r0.store(a.root + e);
    r1.store(a.root + e + kV);
  }
}

// One block of kW elements of one tensor: docs/SPEC.md's update of variant V. The
// direction u the base rule takes and the value inserted into the buffer come first
// (they are what the variants differ in), then the insert (shared), then the base rule.
// STAGE (int8 slots): the value inserted is only written to `slot`, an fp32 staging
// area; quantize_insert() then quantizes it and updates S block by block. SR: the param
// is rounded stochastically (a.round); e: p's element index in the tensor. TM: the
// moments' storage (T; float for 8-bit moments, whose fp32 values are staged around this).
template <int V, typename T, typename TS, bool STAGE, bool SR, typename TM = T>
inline void update_block(const UpdateArgs& a, int64_t e, T* p, const T* g, TM* mom, TM* sq,
                         T* extra, TS* slot, float* sum) {
  Vec g0, g1, x0, x1, s0, s1;
  load_gradient<T>(a, g, g0, g1);
  IO<T>::load(p, x0, x1);
  IO<float>::load(sum, s0, s1);
  const Vec k(a.k_before);  // S / k: the buffer as it was before this step's insert

  Vec u0, u1, n0, n1;  // u: the direction; n: the value inserted
  Vec m0, m1;          // AdamCM: the new momentum
  if constexpr (V == kAdamCM) {
    if (a.has_wd) {  // decoupled (AdamW)
      const Vec f(a.wd_factor);
      x0 = x0 * f;
      x1 = x1 * f;
    }
    if (a.first) {
      m0 = m1 = u0 = u1 = Vec(0.f);
      n0 = g0;  // SPEC quirk: the first slot holds the raw (unscaled) gradient
      n1 = g1;
    } else {
      Vec o0, o1;
      IO<TM>::load(mom, o0, o1);
      m0 = lerp(o0, g0, a.one_minus_beta1);
      m1 = lerp(o1, g1, a.one_minus_beta1);
      u0 = m0 + s0 / k;  // the aggregate
      u1 = m1 + s1 / k;
      n0 = m0;
      n1 = m1;
    }
  } else if constexpr (V == kSGDCG) {
    if (a.has_wd) {  // d = g + wd p is what is stored too (quirk)
      const Vec wd(a.wd);
      g0 = g0 + wd * x0;
      g1 = g1 + wd * x1;
    }
    n0 = g0;
    n1 = g1;
    u0 = a.first ? g0 : g0 + s0 / k;
    u1 = a.first ? g1 : g1 + s1 / k;
  } else {  // kAdamCG, kRMSpropCG
    n0 = g0;
    n1 = g1;
    if constexpr (V == kRMSpropCG) {  // the buffer mean alone (quirk)
      u0 = a.first ? g0 : s0 / k;
      u1 = a.first ? g1 : s1 / k;
    } else {
      u0 = a.first ? g0 : g0 + s0 / k;
      u1 = a.first ? g1 : g1 + s1 / k;
    }
    if (a.has_wd) {  // coupled L2, after the aggregate
      const Vec wd(a.wd);
      u0 = u0 + wd * x0;
      u1 = u1 + wd * x1;
    }
  }

  if (STAGE && slot != nullptr) {
    IO<TS>::store(slot, n0, n1);
  } else if (slot != nullptr) {
    insert_block<TS>(slot, sum, s0, s1, n0, n1);
  }

  if constexpr (V == kAdamCM || V == kAdamCG) {
    Vec num0, num1;  // what moves p: the aggregate (CM) or Adam's m (CG)
    if constexpr (V == kAdamCG) {
      Vec o0, o1;
      IO<TM>::load(mom, o0, o1);
      m0 = lerp(o0, u0, a.one_minus_beta1);
      m1 = lerp(o1, u1, a.one_minus_beta1);
      num0 = m0;
      num1 = m1;
    } else {
      num0 = u0;
      num1 = u1;
    }
    Vec v0, v1;  // CM: v tracks the aggregate
    second_moment<TM>(a, sq, u0, u1, v0, v1);
    if (extra != nullptr) {  // amsgrad
      Vec w0, w1;
      IO<T>::load(extra, w0, w1);
      v0 = at::vec::maximum(w0, v0);
      v1 = at::vec::maximum(w1, v1);
      IO<T>::store(extra, v0, v1);
    }
    IO<TM>::store(mom, m0, m1);
    const Vec r0 = v0.sqrt(), r1 = v1.sqrt();
    store_root(a, e, r0, r1);
    if (V == kAdamCM && a.first) {  // no Adam update on CM's first step (eps 0: 0/0)
      store_param<T, SR>(a, p, e, x0, x1);
      return;
    }
    const Vec sqrt_bc2(a.sqrt_bc2), eps(a.eps), step_size(a.step_size);
    const Vec d0 = r0 / sqrt_bc2 + eps;
    const Vec d1 = r1 / sqrt_bc2 + eps;
    store_param<T, SR>(a, p, e, x0 - (step_size * num0) / d0, x1 - (step_size * num1) / d1);
  } else if constexpr (V == kRMSpropCG) {
    Vec q0, q1, d0, d1;
    second_moment<TM>(a, sq, u0, u1, q0, q1);
    const Vec eps(a.eps);
    if (extra != nullptr) {  // centered
      Vec c0, c1;
      IO<T>::load(extra, c0, c1);
      c0 = lerp(c0, u0, a.one_minus_beta2);
      c1 = lerp(c1, u1, a.one_minus_beta2);
      IO<T>::store(extra, c0, c1);
      d0 = (q0 - c0 * c0).sqrt() + eps;
      d1 = (q1 - c1 * c1).sqrt() + eps;
    } else {
      const Vec r0 = q0.sqrt(), r1 = q1.sqrt();
      store_root(a, e, r0, r1);
      d0 = r0 + eps;
      d1 = r1 + eps;
    }
    const Vec lr(a.lr);
    if (mom != nullptr) {
      Vec b0, b1;
      IO<TM>::load(mom, b0, b1);
      const Vec mu(a.beta1);
      b0 = b0 * mu + u0 / d0;
      b1 = b1 * mu + u1 / d1;
      IO<TM>::store(mom, b0, b1);
      store_param<T, SR>(a, p, e, x0 - lr * b0, x1 - lr * b1);
    } else {
      store_param<T, SR>(a, p, e, x0 - lr * (u0 / d0), x1 - lr * (u1 / d1));
    }
  } else {  // kSGDCG
    if (mom != nullptr) {  // the first momentum step copies d
      if (!a.first) {
        Vec o0, o1;
        IO<TM>::load(mom, o0, o1);
        const Vec mu(a.beta1), omd(a.one_minus_dampening);
        u0 = o0 * mu + omd * u0;
        u1 = o1 * mu + omd * u1;
      }
      IO<TM>::store(mom, u0, u1);
    }
    const Vec lr(a.lr);
    store_param<T, SR>(a, p, e, x0 - lr * u0, x1 - lr * u1);
  }
}

// The update of elements [begin, end); element i of the slot written is slot[i - origin].
// TF (AdamCM, fp32 params, floating-point slots): the dtype of the slot a deferred insert
// goes into, written block by block just before the block's update reads S (fused into
// one loop, its slot prefetched: 1.30-1.33x fused AdamW against 1.42-1.43x with a
// separate flush loop per 4 KiB, bench/results/deferred_insert_one_loop_gpt2-11m_cpu.txt);
// void: none (int8 slots: flush_quantized, per kQBlock, before this runs).
// norm (nullable): the gradient's squares are added to it as norm_kernel adds them
// (begin must be the chunk's start or an even number of blocks after it); summed here,
// from the block just updated, the one pass measured about 1% faster than with a second
// loop over each chunk's gradient (bench/results/norm_in_update_gpt2-11m_cpu.txt).
template <int V, typename T, typename TS, bool STAGE, bool SR, typename TF = void,
          typename TM = T>
void update_range(const UpdateArgs& a, int64_t begin, int64_t end, TS* slot_base,
                  int64_t origin, SumSq* norm = nullptr) {
  constexpr bool FLUSH = !std::is_void_v<TF>;
  using TFS = std::conditional_t<FLUSH, TF, float>;
  static_assert(!FLUSH || (std::is_same_v<T, float> && !std::is_same_v<TF, int8_t>),
                "deferred inserts are written here for fp32 momenta into fp slots only");
  TFS* fslot = FLUSH ? static_cast<TFS*>(a.flush_slot) : nullptr;  // (int8: elsewhere)
  auto block = [&](int64_t index, T* p, const T* g, TM* m, TM* v, T* e, TS* s, float* sm,
                   TFS* f) {
    if constexpr (FLUSH) flush_insert<TF>(m, f, sm);
    update_block<V, T, TS, STAGE, SR, TM>(a, index, p, g, m, v, e, s, sm);
  };
  T* p = static_cast<T*>(a.p);
  const T* g = static_cast<const T*>(a.g);
  TM* mom = static_cast<TM*>(a.mom);
  TM* sq = static_cast<TM*>(a.sq);
  T* extra = static_cast<T*>(a.extra);
  float* sum = a.sum;
  auto at = [](auto* ptr, int64_t i) { return ptr ? ptr + i : nullptr; };
  auto slot_at = [&](int64_t i) { return slot_base ? slot_base + (i - origin) : nullptr; };
  const Vec scale(a.grad_scale);
  SumSq n = norm ? *norm : SumSq{};
  int64_t i = begin;
  for (int64_t b = 0; i + kW <= end; i += kW, ++b) {
    if constexpr (STAGE) {  // (the staging area is in cache)
      prefetch_ahead(i, p, g, mom, sq, extra, sum);
    } else {  // (the flushed slot's stream too)
      prefetch_ahead(i, p, g, mom, sq, extra, slot_base, sum, fslot);
    }
    block(i, p + i, g + i, at(mom, i), at(sq, i), at(extra, i), slot_at(i), sum + i,
          at(fslot, i));
    if (norm != nullptr) {  // (g + i is in L1)
      if (b & 1) {
        sq_block<T>(g + i, a.scaled, scale, n.b0, n.b1);
      } else {
        sq_block<T>(g + i, a.scaled, scale, n.a0, n.a1);
      }
    }
  }
  if (norm != nullptr) *norm = n;
  if (i == end) return;
  // The tail of a tensor: the same block code on zero-padded copies, then copy back.
  const int64_t r = end - i;
  T tp[kW], tg[kW], te[kW];
  TM tm[kW], tv[kW];
  TS ts[kW];
  TFS tf[kW];
  float tsum[kW];
  auto in = [r](void* dst, const void* src, size_t size) {
    std::memset(dst, 0, kW * size);
    if (src != nullptr) std::memcpy(dst, src, r * size);
  };
  auto out = [r](void* dst, const void* src, size_t size) {
    if (dst != nullptr) std::memcpy(dst, src, r * size);
  };
  in(tp, p + i, sizeof(T));
  in(tg, g + i, sizeof(T));
  in(tm, at(mom, i), sizeof(TM));
  in(tv, at(sq, i), sizeof(TM));
  in(te, at(extra, i), sizeof(T));
  in(ts, slot_at(i), sizeof(TS));
  in(tf, at(fslot, i), sizeof(TFS));
  in(tsum, sum + i, sizeof(float));
  block(i, tp, tg, mom ? tm : nullptr, sq ? tv : nullptr, extra ? te : nullptr,
        slot_base ? ts : nullptr, tsum, fslot ? tf : nullptr);
  if (norm != nullptr) {  // (zero padding adds nothing)
    sq_block<T>(tg, a.scaled, scale, n.a0, n.a1);
    *norm = n;
  }
  out(p + i, tp, sizeof(T));
  out(at(mom, i), tm, sizeof(TM));
  out(at(sq, i), tv, sizeof(TM));
  out(at(extra, i), te, sizeof(T));
  out(slot_at(i), ts, sizeof(TS));
  out(at(fslot, i), tf, sizeof(TFS));
  if ((slot_base && !STAGE) || fslot) std::memcpy(sum + i, tsum, r * sizeof(float));
}

// ---------------------------------------------------------------- blockwise quantization

using IVec = Vectorized<int32_t>;
static_assert(IVec::size() == kV, "an int32 vector holds a float vector's lanes");

inline IVec bits_of(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(v);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(v);  // (at::vec's generic cast goes through memory)
#else
  return at::vec::cast<int32_t>(v);
#endif
}

// kV int8 values as fp32.
inline Vec int8_values(const int8_t* q) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
#else
  float t[kV];
  for (int64_t l = 0; l < kV; ++l) t[l] = static_cast<float>(q[l]);
  return Vec::loadu(t);
#endif
}

// A block's 0-padded length: whole groups of kGroup elements, the codes' unit of store.
constexpr int64_t kGroup = 4 * kV;
static_assert(kQBlock % kGroup == 0, "a block is whole groups");
inline int64_t padded_length(int64_t n) { return (n + kGroup - 1) / kGroup * kGroup; }

// The scale of a block of `padded` values x (zero-padded: zeros change no maximum), from
// mag(v, i), the magnitudes (sign bit clear) of the vector v at x + i: the largest / qmax,
// rounded to nearest, or NaN for a block holding a NaN or an infinity. A magnitude's bits
// order as its value, and a NaN's or an infinity's lie above every finite one's, so one
// integer maximum per vector tracks both (a float maximum and a NaN poison x * 0 took
// three operations). Four independent chains, each a named register: with one chain the
// loop waited on each op's latency, and an array of them was kept on the stack.
template <typename Mag>
inline float block_scale_of(const float* x, int64_t padded, float qmax, Mag&& mag) {
  const IVec zero(0);
  IVec a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  auto add = [&](IVec& amax, int64_t i) {
    amax = at::vec::maximum(amax, bits_of(mag(Vec::loadu(x + i), i)));
  };
  int64_t i = 0;
  for (; i + 4 * kV <= padded; i += 4 * kV) {
    add(a0, i);
    add(a1, i + kV);
    add(a2, i + 2 * kV);
    add(a3, i + 3 * kV);
  }
  for (; i < padded; i += kV) add(a0, i);
  int32_t lanes[kV];
  at::vec::maximum(at::vec::maximum(a0, a1), at::vec::maximum(a2, a3)).store(lanes);
  int32_t top = 0;
  for (int64_t l = 0; l < kV; ++l) top = std::max(top, lanes[l]);
  constexpr int32_t kInfinity = 0x7F800000;
  if (top >= kInfinity) return std::numeric_limits<float>::quiet_NaN();
  float largest;
  std::memcpy(&largest, &top, sizeof(float));
  return largest / qmax;
}

// x rounded to the nearest integer, ties to even (the rounding mode torch leaves set).
inline IVec nearest_int(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtps_epi32(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtps_epi32(x);
#else
  return at::vec::convert_to_int_of_same_size(x.round());
#endif
}

// Four vectors of codes (int32 lanes holding B's values) stored as kGroup bytes at out.
template <typename B>
C10_ALWAYS_INLINE void store_group(const IVec& c0, const IVec& c1, const IVec& c2, const IVec& c3,
                        B* out) {
#if defined(CPU_CAPABILITY_AVX512)  // (one narrowing per vector: the values fit in B)
  const IVec c[4] = {c0, c1, c2, c3};
  for (int k = 0; k < 4; ++k) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k * kV), _mm512_cvtepi32_epi8(c[k]));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // The packs work per 128-bit half: the bytes come out as dwords c0[0:4], c1[0:4],
  // c2[0:4], c3[0:4], c0[4:8], ..., which the permutation puts in order.
  __m256i b;
  if constexpr (std::is_signed_v<B>) {
    b = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  } else {
    b = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  }
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), b);
#else
  int32_t t[kGroup];
  c0.store(t);
  c1.store(t + kV);
  c2.store(t + 2 * kV);
  c3.store(t + 3 * kV);
  for (int64_t l = 0; l < kGroup; ++l) out[l] = static_cast<B>(t[l]);
#endif
}

// The n codes code(i) of a block (i: a vector's first element; x zero-padded to
// padded_length(n)) stored a group at a time, the last group through a copy.
template <typename B, typename Code>
C10_ALWAYS_INLINE void store_codes(int64_t n, B* out, Code&& code) {
  int64_t i = 0;
  for (; i + kGroup <= n; i += kGroup) {
    store_group<B>(code(i), code(i + kV), code(i + 2 * kV), code(i + 3 * kV), out + i);
  }
  if (i < n) {
    B tail[kGroup];
    store_group<B>(code(i), code(i + kV), code(i + 2 * kV), code(i + 3 * kV), tail);
    std::memcpy(out + i, tail, (n - i) * sizeof(B));
  }
}

// int8 slots (cm_fused/quantize.py, the same operations in the same order): the block's
// n quotients x / s, rounded and clamped to [-127, 127], into q (x zero-padded; clamping
// first gives the same integers). (A division, as the reference's: multiplying by 1 / s
// and redoing the blocks where a product lay near a tie was slower.)
inline void slot_codes(const float* x, int64_t n, float s, int8_t* q) {
  const Vec vs(s), lo(-127.f), hi(127.f);  // (the clamp is reachable only with a tiny s)
  store_codes(n, q, [&](int64_t i) C10_ALWAYS_INLINE_ATTRIBUTE {
    return nearest_int(at::vec::clamp(Vec::loadu(x + i) / vs, lo, hi));
  });
}

// Quantize the n <= kQBlock staged values x of one block into q and *scale, and update S
// by the values the slot held and holds: S <- (S - q_old * scale_old) + q * scale (sum
// nullptr: no running sum is kept).
inline void quantize_insert(float* __restrict x, int64_t n, int8_t* q, float* scale,
                            float* __restrict sum) {
  const int64_t padded = padded_length(n);
  std::memset(static_cast<void*>(x + n), 0, (padded - n) * sizeof(float));
  const float s = block_scale_of(x, padded, 127.f,
                                 [](const Vec& v, int64_t) { return v.abs(); });
  const float s_old = *scale;
  *scale = s;
  int8_t fresh[kQBlock];
  int8_t* codes = sum != nullptr ? fresh : q;  // (S takes the codes the slot held)
  if (!(s > 0.f)) {  // a NaN scale (non-finite block) or a zero one: the block stores zeros
    std::memset(codes, 0, n);
  } else {
    slot_codes(x, n, s, codes);
  }
  if (sum != nullptr) {  // (a plain loop, which the compiler vectorises)
    for (int64_t i = 0; i < n; ++i) {
      sum[i] = (sum[i] - static_cast<float>(q[i]) * s_old) + static_cast<float>(fresh[i]) * s;
    }
    std::memcpy(q, fresh, n);
  }
}

// Slots without a running sum (docs/SPEC.md): what the n <= kQBlock elements of a block
// sum to over the C int8 slots, ((B[0] + B[1]) + B[2]) + ..., into held: four vectors at a
// time through all slots in registers (one vector at a time waited on each add). block:
// the block's index in the tensor; n_el: the tensor's elements (the slots' stride).
inline void slot_sum(const int8_t* __restrict slots, const float* __restrict scales,
                     int64_t C, int64_t n_el, int64_t block, int64_t n,
                     float* __restrict held) {
  const int64_t nb = (n_el + kQBlock - 1) / kQBlock;
  const int8_t* q = slots + block * kQBlock;
  const float* s = scales + block;
  int64_t i = 0;
  for (; i + 4 * kV <= n; i += 4 * kV) {  // (whole vectors only: the tail may end the tensor)
    const Vec s0(s[0]);
    Vec a0 = int8_values(q + i) * s0, a1 = int8_values(q + i + kV) * s0;
    Vec a2 = int8_values(q + i + 2 * kV) * s0, a3 = int8_values(q + i + 3 * kV) * s0;
    for (int64_t j = 1; j < C; ++j) {
      const int8_t* qj = q + j * n_el + i;
      const Vec sj(s[j * nb]);
      a0 = a0 + int8_values(qj) * sj;
      a1 = a1 + int8_values(qj + kV) * sj;
      a2 = a2 + int8_values(qj + 2 * kV) * sj;
      a3 = a3 + int8_values(qj + 3 * kV) * sj;
    }
    a0.store(held + i);
    a1.store(held + i + kV);
    a2.store(held + i + 2 * kV);
    a3.store(held + i + 3 * kV);
  }
  for (; i < n; ++i) {
    float acc = static_cast<float>(q[i]) * s[0];
    for (int64_t j = 1; j < C; ++j) acc = acc + static_cast<float>(q[j * n_el + i]) * s[j * nb];
    held[i] = acc;
  }
}

// ---------------------------------------------------------------- 8-bit moments

// e4m3 (cm_fused/quantize.py: e4m3_code, e4m3_value; docs/SPEC.md "8-bit moments").
constexpr float kE4M3Max = 448.f;
constexpr int32_t kSign = 0x80;

// kV codes' signed values: the magnitude's e4m3 value (c & 0x7F: below 8 a multiple of
// 2^-9, else the code's bits rebiased into an fp32's), with the momentum's sign bit moved
// to the fp32 sign.
inline Vec e4m3_signed(const uint8_t* codes) {
#if defined(CPU_CAPABILITY_AVX512)
  const IVec c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
#elif defined(CPU_CAPABILITY_AVX2)
  const IVec c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
#else
  int32_t t[kV];
  for (int64_t l = 0; l < kV; ++l) t[l] = codes[l];
  const IVec c = IVec::loadu(t);
#endif
  const IVec mag = c & IVec(kSign - 1);
  const IVec sub = bits_of(at::vec::convert_to_fp_of_same_size<float>(mag) * Vec(0x1p-9f));
  const IVec normal = (mag + IVec(960)) << IVec(20);
  const IVec bits = IVec::blendv(normal, sub, mag < IVec(8)) | ((c & IVec(kSign)) << IVec(24));
  return at::vec::cast<float>(bits);
}

// The fp32 values n codes of one block hold: the momentum's signed, the second moment's
// the square of the code's value (-D * scale is -(D * scale): rounding to nearest is
// symmetric). Whole vectors (x has room for them), the codes' tail through a copy.
template <bool SECOND>
inline void decode_moment(const uint8_t* __restrict codes, float scale, int64_t n,
                          float* __restrict x) {
  const Vec s(scale);
  auto put = [&](const uint8_t* c, int64_t i) {
    const Vec t = e4m3_signed(c) * s;
    (SECOND ? t * t : t).store(x + i);
  };
  int64_t i = 0;
  for (; i + kV <= n; i += kV) put(codes + i, i);
  if (i < n) {
    uint8_t tail[kV] = {};
    std::memcpy(tail, codes + i, n - i);
    put(tail, i);
  }
}

// The e4m3 code of magnitudes y in [0, 448]: below 2^-6, rint(y * 512) (a multiple of
// 2^-9), as the bits of y + 2^14 above 2^14's (fp32's spacing there is 2^-9, so the
// addition rounds y to that multiple, ties to even); else y's bits rounded to three
// mantissa bits, ties to even, and rebiased.
constexpr int32_t kMinNormal = 0x3C800000;  // 2^-6's bits (y >= 0: bits order as values)

C10_ALWAYS_INLINE IVec e4m3_code(const Vec& y) {  // (called per vector)
  const IVec b = bits_of(y);
  const IVec normal =
      ((b + IVec(0x7FFFF) + ((b >> IVec(20)) & IVec(1))) >> IVec(20)) - IVec(960);
  const IVec sub = bits_of(y + Vec(16384.f)) - IVec(0x46800000);
  return IVec::blendv(normal, sub, b < IVec(kMinNormal));
}

// The n codes of one block's values x (magnitudes mag: |x|, or the second moment's roots;
// both zero-padded) by the scale s, as quantize_moment: min(mag / s, 448)'s e4m3 code (a
// division, as the reference's: see slot_codes), the momentum's sign in bit 7, and a
// positive second moment never 0.
template <bool SECOND>
inline void moment_codes(const float* x, const float* mag, int64_t n, float s,
                         uint8_t* codes) {
  const Vec vs(s), vmax(kE4M3Max);
  store_codes(n, codes, [&](int64_t i) C10_ALWAYS_INLINE_ATTRIBUTE {  // (else a call each)
    const Vec xv = Vec::loadu(x + i);
    const Vec m = SECOND ? Vec::loadu(mag + i) : xv.abs();
    IVec code = e4m3_code(at::vec::clamp_max(m / vs, vmax));
    if constexpr (SECOND) {  // (m > 0: its bits > 0)
      code = IVec::blendv(code, IVec(1), (code == IVec(0)) & (bits_of(m) > IVec(0)));
    } else {  // x < 0 (a -0 has code 0)
      code = code | IVec::blendv((bits_of(xv) < IVec(0)) & IVec(kSign), IVec(0),
                                 code == IVec(0));
    }
    return code;
  });
}

// One block's n new values x (fp32) -> codes and *scale, as quantize_moment: the
// momentum by its magnitude and sign, the second moment by its correctly rounded root
// (root: the roots as the update computed them, nullptr: computed here).
template <bool SECOND>
inline void encode_moment(float* x, int64_t n, uint8_t* codes, float* scale,
                          float* root = nullptr) {
  const int64_t padded = padded_length(n);  // (zeros change no maximum)
  std::memset(static_cast<void*>(x + n), 0, (padded - n) * sizeof(float));
  float roots[SECOND ? kQBlock : 1];  // (the momentum's magnitudes are recomputed: cheaper)
  float* mag = root != nullptr ? root : roots;
  float s;
  if (!SECOND) {
    s = block_scale_of(x, padded, kE4M3Max, [](const Vec& v, int64_t) { return v.abs(); });
  } else if (root != nullptr) {
    std::memset(static_cast<void*>(root + n), 0, (padded - n) * sizeof(float));
    s = block_scale_of(x, padded, kE4M3Max,
                       [root](const Vec&, int64_t i) { return Vec::loadu(root + i).abs(); });
  } else {
    s = block_scale_of(x, padded, kE4M3Max, [&roots](const Vec& v, int64_t i) {
      const Vec m = v.sqrt();  // (IEEE sqrt: correctly rounded)
      m.store(roots + i);
      return m.abs();  // (a NaN's sign bit may be set)
    });
  }
  *scale = s;
  if (!(s > 0.f)) {  // a non-finite block (NaN scale) or a zero scale: every code 0
    std::memset(codes, 0, n);
    return;
  }
  moment_codes<SECOND>(x, mag, n, s, codes);
}

// A deferred insert into an int8 slot, elements [b, e) (b a multiple of kQBlock, e - b
// at most kQBlock): the fp32 momentum as stored is quantized into the slot, as the step
// that decided it would have done (quantize_insert).
inline void flush_quantized(const UpdateArgs& a, int64_t b, int64_t e) {
  float stage[kQBlock];
  std::memcpy(stage, static_cast<const float*>(a.mom) + b, (e - b) * sizeof(float));
  quantize_insert(stage, e - b, static_cast<int8_t*>(a.flush_slot) + b,
                  a.flush_scales + b / kQBlock, a.sum + b);
}

// A copy of a's pointers moved to element b (the block's update then runs on [0, n)),
// the stochastic rounding's element offset with them.
// TMS: the moments' storage (T, or uint8_t codes).
template <typename T, typename TMS>
inline UpdateArgs at_element(const UpdateArgs& a, int64_t b) {
  auto move = [b](auto* ptr, size_t size) -> decltype(ptr) {
    using P = std::conditional_t<std::is_const_v<std::remove_pointer_t<decltype(ptr)>>,
                                 const char*, char*>;
    return ptr ? reinterpret_cast<decltype(ptr)>(reinterpret_cast<P>(ptr) + b * size)
               : nullptr;
  };
  UpdateArgs s = a;
  s.p = move(a.p, sizeof(T));
  s.g = move(a.g, sizeof(T));
  s.mom = move(a.mom, sizeof(TMS));
  s.sq = move(a.sq, sizeof(TMS));
  s.extra = move(a.extra, sizeof(T));
  s.sum = move(a.sum, sizeof(float));
  s.round_offset = a.round_offset + static_cast<uint32_t>(b);
  return s;
}

// The 8-bit streams (codes, int8 slots) of the block kAhead elements on, four cache lines
// each: update_range prefetches only the streams it reads itself, and without these the
// block loop below stalled on every new block's codes and slots.
inline void prefetch_bytes(const void* stream, int64_t i) {
  for (int64_t line = 0; line < kQBlock; line += 64) {
    prefetch_one(static_cast<const uint8_t*>(stream), i + line);
  }
}

// 8-bit moments of the kQBlock block at element b (n elements): its codes decoded into the
// fp32 staging areas m and v, onto which s's moment pointers are moved (a role unused:
// nothing); unstage_moments encodes the new values staged there back.
inline void stage_moments(const UpdateArgs& a, int64_t b, int64_t n, float* m, float* v,
                          UpdateArgs* s) {
  prefetch_bytes(a.mom, b);
  prefetch_bytes(a.sq, b);
  if (a.mom) {
    decode_moment<false>(static_cast<const uint8_t*>(a.mom) + b, a.mom_scales[b / kQBlock], n,
                         m);
    s->mom = m;
  }
  if (a.sq) {
    decode_moment<true>(static_cast<const uint8_t*>(a.sq) + b, a.sq_scales[b / kQBlock], n, v);
    s->sq = v;
  }
}

inline void unstage_moments(const UpdateArgs& a, int64_t b, int64_t n, float* m, float* v,
                            float* root = nullptr) {
  if (a.mom) {
    encode_moment<false>(m, n, static_cast<uint8_t*>(a.mom) + b, a.mom_scales + b / kQBlock);
  }
  if (a.sq) {
    encode_moment<true>(v, n, static_cast<uint8_t*>(a.sq) + b, a.sq_scales + b / kQBlock,
                        root);
  }
}

// M8: the tensor's moments are 8-bit codes (a.mom_scales, a.sq_scales). The update then
// runs one kQBlock block at a time, as with int8 slots: the codes decoded into fp32
// staging areas, the block updated on them, its new moments encoded.
template <int V, typename T, typename TS, bool SR, bool M8>
double update_chunk(const UpdateArgs& a, int64_t begin, int64_t end) {
  constexpr bool kInt8 = std::is_same_v<TS, int8_t>;
  using TM = std::conditional_t<M8, float, T>;
  SumSq sumsq;
  SumSq* norm = a.sum_squares ? &sumsq : nullptr;
  if constexpr (V == kAdamCM && std::is_same_v<T, float> && !M8) {
    if (a.flush_slot != nullptr) {  // a deferred insert, then the update (no insert)
      if constexpr (!kInt8) {
        update_range<V, T, float, false, false, TS>(a, begin, end, nullptr, 0, norm);
      } else {  // one block of the quantizer at a time (measured faster)
        for (int64_t b = begin; b < end; b += kQBlock) {
          const int64_t e = std::min(end, b + kQBlock);
          flush_quantized(a, b, e);
          update_range<V, T, float, false, false>(a, b, e, nullptr, 0, norm);
        }
      }
      return sumsq.total();
    }
  }
  if constexpr (!kInt8 && !M8) {
    update_range<V, T, TS, false, SR>(a, begin, end, static_cast<TS*>(a.slot), 0, norm);
  } else {
    // Block by block (begin is a multiple of kQBlock): the update stages the values
    // inserted (int8 slots), then the block is quantized.
    int8_t* q = kInt8 ? static_cast<int8_t*>(a.slot) : nullptr;
    for (int64_t b = begin; b < end; b += kQBlock) {
      const int64_t n = std::min(end, b + kQBlock) - b;
      UpdateArgs s = at_element<T, std::conditional_t<M8, uint8_t, T>>(a, b);
      float held[kQBlock], stage[kQBlock], m[kQBlock], v[kQBlock], root[kQBlock];
      if constexpr (M8) {
        stage_moments(a, b, n, m, v, &s);
        // the new second moments' roots, as the update computes them (with amsgrad it
        // takes the root of their maximum with v_max instead: then the encoder's own)
        if (a.sq && a.extra == nullptr) s.root = root;
      }
      if constexpr (kInt8) {
        prefetch_bytes(q, b);
        if (a.sum == nullptr) {
          for (int64_t j = 0; j < a.n_slots; ++j) {
            prefetch_bytes(static_cast<const int8_t*>(a.slots) + j * a.numel, b);
          }
        }
      }
      if constexpr (kInt8) {
        if (a.sum == nullptr) {  // no running sum: the slots' sum, before this insert
          slot_sum(static_cast<const int8_t*>(a.slots), a.all_scales, a.n_slots, a.numel,
                   b / kQBlock, n, held);
          s.sum = held;
        }
      }
      if constexpr (kInt8) {
        update_range<V, T, float, true, SR, void, TM>(s, 0, n, q ? stage : nullptr, 0, norm);
        if (q) {
          quantize_insert(stage, n, q + b, a.slot_scales + b / kQBlock,
                          a.sum ? a.sum + b : nullptr);
        }
      } else {
        TS* slot = a.slot ? static_cast<TS*>(a.slot) + b : nullptr;
        update_range<V, T, TS, false, SR, void, TM>(s, 0, n, slot, 0, norm);
      }
      if constexpr (M8) unstage_moments(a, b, n, m, v, s.root);
    }
  }
  return sumsq.total();
}

// Rounding or not is decided here, once per chunk: the loops of the plain store carry
// no trace of it. (fp32 params have nothing to round: step.cpp refuses them.)
template <int V, typename T, typename TS, bool M8>
double update_kernel(const UpdateArgs& a, int64_t begin, int64_t end) {
  if constexpr (!std::is_same_v<T, float>) {
    if (a.round) return update_chunk<V, T, TS, true, M8>(a, begin, end);
  }
  return update_chunk<V, T, TS, false, M8>(a, begin, end);
}

// ---------------------------------------------------------------- adaptive memory

// Where the reduce pass's terms go. The reference sums fp32 terms in fp64; fp32 lanes
// summed over a whole chunk would drift from it, and converting every term to fp64
// costs more than the pass's memory traffic (it made the pass compute-bound at half
// the bandwidth). So terms are summed in fp32 registers over kFlush blocks, then added
// to fp64 lanes: kFlush fp32 additions per lane at most, in a fixed order.
constexpr int64_t kFlush = kQBlock / kW;  // (16 blocks of 16 elements; AVX-512: 8 of 32)

struct Lanes {  // fp64 lanes, kW per sum
  double acc[kAMSums * kW] = {};

  // Add the first `valid` of kW fp32 terms to sum k; the padding of a tensor's last
  // block is left out (there P = c * eps, possibly 0, makes NaN terms).
  void add(int k, const Vec& lo, const Vec& hi, int64_t valid = kW) {
    float t[kW];
    lo.store(t);
    hi.store(t + kV);
    for (int64_t l = 0; l < valid; ++l) acc[k * kW + l] += static_cast<double>(t[l]);
  }
};

struct Registers {  // fp32 vectors, flushed into Lanes
  Vec lo[kAMSums], hi[kAMSums];

  Registers() { clear(); }
  void clear() {
    for (int k = 0; k < kAMSums; ++k) lo[k] = hi[k] = Vec(0.f);
  }
  void add(int k, const Vec& l, const Vec& h) {
    lo[k] = lo[k] + l;
    hi[k] = hi[k] + h;
  }
  void flush(Lanes& lanes) {
    for (int k = 0; k < kAMSums; ++k) lanes.add(k, lo[k], hi[k]);
    clear();
  }
};

// The tail block's sink: straight into the fp64 lanes, padding left out.
struct Tail {
  Lanes& lanes;
  int64_t valid;
  void add(int k, const Vec& l, const Vec& h) { lanes.add(k, l, h, valid); }
};

// One block of kW elements of variant V (kAdamAM, kSGDAM). REDUCE: add the block's terms
// to acc (kAMSums rows of kW lanes), write nothing; else: the update, with beta decided
// (SR: the param rounded stochastically; e: p's element index in the tensor). One body
// for both passes, so g, v and P are the same bits in each. TM: the moments' type (T, or
// fp32 staging areas of decoded 8-bit moments).
template <int V, typename T, bool REDUCE, bool SR, typename Sink, typename TM = T>
inline void am_block(const UpdateArgs& a, int64_t e, T* p, const T* g, TM* d, TM* v,
                     Sink& sum) {
  Vec g0, g1, x0, x1, d0, d1;
  load_gradient<T>(a, g, g0, g1);
  IO<T>::load(p, x0, x1);
  IO<TM>::load(d, d0, d1);
  const Vec one(1.f), lam(a.lam);
  if constexpr (V == kSGDAM) {
    if (a.has_wd) {  // coupled L2
      const Vec wd(a.wd);
      g0 = g0 + wd * x0;
      g1 = g1 + wd * x1;
    }
    if constexpr (REDUCE) {
      const Vec opl(a.one_plus_lam);
      const Vec e0 = d0 - g0, e1 = d1 - g1;  // delta
      sum.add(0, e0 * e0, e1 * e1);
      sum.add(1, (opl * g0) * d0 - e0 * (g0 + lam * d0), (opl * g1) * d1 - e1 * (g1 + lam * d1));
    } else {
      if (!a.first) {
        const Vec cd(a.coef_d), cg(a.coef_g);
        g0 = cd * d0 + cg * g0;
        g1 = cd * d1 + cg * g1;
      }
      IO<TM>::store(d, g0, g1);
      const Vec lr(a.lr);
      store_param<T, SR>(a, p, e, x0 - lr * g0, x1 - lr * g1);
    }
  } else {  // kAdamAM
    Vec q0, q1;
    second_moment_value<TM>(a, v, g0, g1, q0, q1);
    // reference.adam_am_planes: 1/P = R*W and 1/R = P*W, one division per element.
    const Vec c(a.am_c), k(a.inv_sqrt_bc2), eps(a.eps);
    const Vec P0 = c * (q0.sqrt() * k + eps);
    const Vec P1 = c * (q1.sqrt() * k + eps);
    const Vec lP0 = lam * P0, lP1 = lam * P1;
    const Vec R0 = one + lP0, R1 = one + lP1;
    const Vec w0 = one / (P0 * R0), w1 = one / (P1 * R1);
    if constexpr (REDUCE) {
      const Vec e0 = d0 - g0, e1 = d1 - g1;  // delta
      sum.add(0, (e0 * e0) * w0, (e1 * e1) * w1);
      sum.add(1, (e0 * (g0 + lP0 * d0)) * w0, (e1 * (g1 + lP1 * d1)) * w1);
      sum.add(2, x0 * e0, x1 * e1);
      Vec y0 = d0 * (R0 * w0), y1 = d1 * (R1 * w1);
      if (a.has_wd) {
        const Vec wd(a.wd);
        y0 = y0 + wd * x0;
        y1 = y1 + wd * x1;
      }
      sum.add(3, g0 * y0, g1 * y1);
    } else {
      IO<TM>::store(v, q0, q1);
      const Vec omb(a.one_minus_beta), beta(a.beta);
      const Vec n0 = (omb * g0 + (lP0 + beta) * d0) * (P0 * w0);
      const Vec n1 = (omb * g1 + (lP1 + beta) * d1) * (P1 * w1);
      IO<TM>::store(d, n0, n1);
      if (a.has_wd) {  // decoupled (AdamW)
        const Vec f(a.wd_factor);
        x0 = x0 * f;
        x1 = x1 * f;
      }
      const Vec lr(a.lr);
      store_param<T, SR>(a, p, e, x0 - (lr * n0) * (R0 * w0), x1 - (lr * n1) * (R1 * w1));
    }
  }
}

template <int V, typename T, typename TM>
void am_reduce_range(const UpdateArgs& a, int64_t begin, int64_t end, Lanes& lanes) {
  T* p = static_cast<T*>(a.p);
  const T* g = static_cast<const T*>(a.g);
  TM* d = static_cast<TM*>(a.mom);
  TM* v = static_cast<TM*>(a.sq);
  int64_t i = begin;
  while (i + kW <= end) {
    // A fresh local per run of blocks, so that the compiler keeps it in registers.
    Registers regs;
    const int64_t stop = std::min(end - kW, i + (kFlush - 1) * kW);
    for (; i <= stop; i += kW) {
      prefetch_ahead(i, p, g, d, v);
      am_block<V, T, true, false, Registers, TM>(a, i, p + i, g + i, d + i, v ? v + i : nullptr,
                                                 regs);
    }
    regs.flush(lanes);
  }
  if (i < end) {  // the tail: zero-padded copies, the padding left out of the sums
    const int64_t r = end - i;
    T tp[kW] = {}, tg[kW] = {};
    TM td[kW] = {}, tv[kW] = {};
    std::memcpy(static_cast<void*>(tp), p + i, r * sizeof(T));
    std::memcpy(static_cast<void*>(tg), g + i, r * sizeof(T));
    std::memcpy(static_cast<void*>(td), d + i, r * sizeof(TM));
    if (v) std::memcpy(static_cast<void*>(tv), v + i, r * sizeof(TM));
    Tail tail{lanes, r};
    am_block<V, T, true, false, Tail, TM>(a, i, tp, tg, td, v ? tv : nullptr, tail);
  }
}

template <int V, typename T, bool SR, typename TM>
void am_update_range(const UpdateArgs& a, int64_t begin, int64_t end) {
  Registers none;  // the update pass sums nothing
  T* p = static_cast<T*>(a.p);
  const T* g = static_cast<const T*>(a.g);
  TM* d = static_cast<TM*>(a.mom);
  TM* v = static_cast<TM*>(a.sq);
  int64_t i = begin;
  for (; i + kW <= end; i += kW) {
    prefetch_ahead(i, p, g, d, v);
    am_block<V, T, false, SR, Registers, TM>(a, i, p + i, g + i, d + i, v ? v + i : nullptr,
                                             none);
  }
  if (i == end) return;
  const int64_t r = end - i;  // the tail: zero-padded copies, then copy back
  T tp[kW] = {}, tg[kW] = {};
  TM td[kW] = {}, tv[kW] = {};
  std::memcpy(static_cast<void*>(tp), p + i, r * sizeof(T));
  std::memcpy(static_cast<void*>(tg), g + i, r * sizeof(T));
  std::memcpy(static_cast<void*>(td), d + i, r * sizeof(TM));
  if (v) std::memcpy(static_cast<void*>(tv), v + i, r * sizeof(TM));
  am_block<V, T, false, SR, Registers, TM>(a, i, tp, tg, td, v ? tv : nullptr, none);
  std::memcpy(static_cast<void*>(p + i), tp, r * sizeof(T));
  std::memcpy(static_cast<void*>(d + i), td, r * sizeof(TM));
  if (v) std::memcpy(static_cast<void*>(v + i), tv, r * sizeof(TM));
}

// 8-bit moments (M8), one kQBlock block at a time (begin is a multiple of kQBlock): the
// codes decoded into fp32 staging areas, the range run on them, and (ENCODE: the update
// pass) the new moments encoded. The blocks of kW and their flushes into the fp64 lanes
// fall where they fall without staging (kQBlock is a multiple of kFlush * kW), so the
// sums are added in the same order.
template <bool ENCODE, typename T, typename Range>
void am_blocks_8bit(const UpdateArgs& a, int64_t begin, int64_t end, Range&& range) {
  static_assert(kQBlock % (kFlush * kW) == 0, "a block's flushes must fall as unstaged");
  for (int64_t b = begin; b < end; b += kQBlock) {
    const int64_t n = std::min(end, b + kQBlock) - b;
    UpdateArgs s = at_element<T, uint8_t>(a, b);
    float d[kQBlock], v[kQBlock];
    stage_moments(a, b, n, d, v, &s);
    range(s, n);
    if constexpr (ENCODE) unstage_moments(a, b, n, d, v);
  }
}

template <int V, typename T, bool M8>
void am_reduce_kernel(const UpdateArgs& a, int64_t begin, int64_t end, double* sums) {
  Lanes lanes;
  if constexpr (M8) {
    am_blocks_8bit<false, T>(a, begin, end, [&lanes](const UpdateArgs& s, int64_t n) {
      am_reduce_range<V, T, float>(s, 0, n, lanes);
    });
  } else {
    am_reduce_range<V, T, T>(a, begin, end, lanes);
  }
  for (int s = 0; s < kAMSums; ++s) {
    double sum = 0.0;
    for (int64_t l = 0; l < kW; ++l) sum += lanes.acc[s * kW + l];
    sums[s] = sum;
  }
}

template <int V, typename T, bool SR, bool M8>
void am_update_chunk(const UpdateArgs& a, int64_t begin, int64_t end) {
  if constexpr (M8) {
    am_blocks_8bit<true, T>(a, begin, end, [](const UpdateArgs& s, int64_t n) {
      am_update_range<V, T, SR, float>(s, 0, n);
    });
  } else {
    am_update_range<V, T, SR, T>(a, begin, end);
  }
}

// As update_kernel: rounding or not, decided once per chunk.
template <int V, typename T, bool M8>
void am_update_kernel(const UpdateArgs& a, int64_t begin, int64_t end) {
  if constexpr (!std::is_same_v<T, float>) {
    if (a.round) {
      am_update_chunk<V, T, true, M8>(a, begin, end);
      return;
    }
  }
  am_update_chunk<V, T, false, M8>(a, begin, end);
}

}  // namespace

const KernelTable& kernel_table() {
  using c10::BFloat16;
  using c10::Half;
#define CM_M8(V, T, TS) {&update_kernel<V, T, TS, false>, &update_kernel<V, T, TS, true>}
#define CM_ROW(V, T) \
  {CM_M8(V, T, float), CM_M8(V, T, BFloat16), CM_M8(V, T, Half), CM_M8(V, T, int8_t)}
#define CM_VARIANT(V) {CM_ROW(V, float), CM_ROW(V, BFloat16), CM_ROW(V, Half)}
#define CM_AM_M8(F, V, T) {&F<V, T, false>, &F<V, T, true>}
#define CM_AM(F, V) {CM_AM_M8(F, V, float), CM_AM_M8(F, V, BFloat16), CM_AM_M8(F, V, Half)}
  static const KernelTable table{
      C10_STRINGIZE(CPU_CAPABILITY),
      {&norm_kernel<float>, &norm_kernel<BFloat16>, &norm_kernel<Half>},
      {CM_VARIANT(kAdamCM), CM_VARIANT(kAdamCG), CM_VARIANT(kSGDCG), CM_VARIANT(kRMSpropCG)},
      {CM_AM(am_reduce_kernel, kAdamAM), CM_AM(am_reduce_kernel, kSGDAM)},
      {CM_AM(am_update_kernel, kAdamAM), CM_AM(am_update_kernel, kSGDAM)},
  };
#undef CM_AM
#undef CM_AM_M8
#undef CM_VARIANT
#undef CM_ROW
#undef CM_M8
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cm_fused
