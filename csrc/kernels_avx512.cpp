// The step kernels built for AVX-512 (F, BW, VL, DQ; kernels_x86.h): 16 fp32 lanes, byte
// narrowing in one instruction, compares into mask registers. Picked where torch runs its
// AVX-512 kernels (then torch.lerp, which the reference's moments use, rounds as ours:
// fused multiply-adds), on CPUs that have these sets.
#define CM_FUSED_CAPABILITY AVX512
#define CM_FUSED_AVX512
#define CM_FUSED_TARGET "avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq"
#include "kernels_x86.h"
