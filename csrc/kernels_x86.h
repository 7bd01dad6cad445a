// The body of an x86 build of the step kernels (kernels_avx2.cpp, kernels_avx512.cpp),
// which define CM_FUSED_CAPABILITY (the namespace: AVX2, AVX512), CM_FUSED_TARGET (the
// instruction sets, as a target attribute names them) and, for AVX-512, CM_FUSED_AVX512.
// A build is picked at run time (step.cpp: kernels()) only on CPUs that have its
// instruction sets, so the extension stays loadable on any x86-64 CPU.
//
// The file is compiled for that target with a pragma rather than per-file flags
// (setuptools gives all sources one set of flags). Every header at::vec pulls in is
// included first, outside the pragma, so inline functions this file shares with the
// other files keep baseline code; at::vec and the kernels land in namespaces of their
// own (at::vec::AVX2, cm_fused::AVX2; likewise AVX512).
#pragma once

#include "step.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
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

#define CM_FUSED_STRING(x) #x
#define CM_FUSED_PRAGMA(x) _Pragma(CM_FUSED_STRING(x))  // (x macro-expanded first)
#ifdef __clang__
CM_FUSED_PRAGMA(clang attribute push(__attribute__((target(CM_FUSED_TARGET))), apply_to = function))
#else
#pragma GCC push_options
CM_FUSED_PRAGMA(GCC target(CM_FUSED_TARGET))
#endif
// sleef.h declares its AVX2 (AVX-512) functions only when __AVX__/__AVX2__/__FMA__
// (__AVX512F__) are defined, and g++ does not define them for a target pragma (it lexes
// the file before parsing it). They are defined for that one header only: no other header
// at::vec uses tests them.
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
#if defined(CM_FUSED_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define CM_FUSED_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef CM_FUSED_UNDEF_AVX512F
#undef __AVX512F__
#endif
#ifdef CM_FUSED_UNDEF_AVX
#undef __AVX__
#endif
#ifdef CM_FUSED_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef CM_FUSED_UNDEF_FMA
#undef __FMA__
#endif

#define CPU_CAPABILITY CM_FUSED_CAPABILITY
#ifdef CM_FUSED_AVX512
#define CPU_CAPABILITY_AVX512
#else
#define CPU_CAPABILITY_AVX2
#endif
#include "step_kernels.h"
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: no x86 build; the run-time pick never asks for it
namespace cm_fused::CM_FUSED_CAPABILITY {
const KernelTable& kernel_table() { return DEFAULT::kernel_table(); }
}  // namespace cm_fused::CM_FUSED_CAPABILITY
#endif
