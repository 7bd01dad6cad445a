// The step kernels built for any x86-64/ARM CPU (at::vec's generic or NEON vectors,
// whatever the compiler's baseline flags give).
#define CPU_CAPABILITY DEFAULT
#include "step_kernels.h"
