// The step kernels built for AVX2+FMA+F16C (kernels_x86.h): picked on CPUs that have
// them where torch runs its AVX2 kernels, or its AVX-512 ones but the CPU lacks an
// instruction set of kernels_avx512.cpp's.
#define CM_FUSED_CAPABILITY AVX2
#define CM_FUSED_TARGET "avx2,fma,f16c,bmi,bmi2"
#include "kernels_x86.h"
