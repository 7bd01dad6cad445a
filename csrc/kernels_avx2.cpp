// The step kernels built for AVX2+FMA+F16C, picked at run time (step.cpp: kernels())
// only on CPUs that have them, so the extension stays loadable on any x86-64 CPU.
//
// The file is compiled for that target with a pragma rather than per-file flags
// (setuptools gives all sources one set of flags). Every header at::vec pulls in is
// included first, outside the pragma, so inline functions this file shares with the
// other files keep baseline code; at::vec and the kernels land in namespaces of their
// own (at::vec::AVX2, cm_fused::AVX2).
#include "step.h"

// -DCM_FUSED_NO_AVX2_TU leaves the AVX2 build out (to measure the DEFAULT kernels).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CM_FUSED_NO_AVX2_TU)
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <immintrin.h>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#endif
// sleef.h declares its AVX2 functions only when __AVX__/__AVX2__/__FMA__ are defined, and
// g++ does not define them for a target pragma (it lexes the file before parsing it).
// They are defined for that one header only: no other header at::vec uses tests them.
#ifndef __AVX__
#define __AVX__ 1
#define CM_FUSED_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define CM_FUSED_UNDEF_AVX2
#endif
#ifndef __FMA__
#define __FMA__ 1
#define CM_FUSED_UNDEF_FMA
#endif
#include <sleef.h>
#ifdef CM_FUSED_UNDEF_AVX
#undef __AVX__
#endif
#ifdef CM_FUSED_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef CM_FUSED_UNDEF_FMA
#undef __FMA__
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "step_kernels.h"
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: no AVX2 build; the run-time pick never asks for it
namespace cm_fused::AVX2 {
const KernelTable& kernel_table() { return DEFAULT::kernel_table(); }
}  // namespace cm_fused::AVX2
#endif
