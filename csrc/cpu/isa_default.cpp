// The CPU row kernels for the portable baseline: at::vec's generic vectors (8 floats, which
// the compiler maps to SSE2), for any x86-64 or other CPU.
#include "vec_isa_prelude.h"
#include "row_kernels.h"
// (both compile for the baseline, see vec_isa_prelude.h)

#define CPU_CAPABILITY DEFAULT
#define LF_ISA default
#include "isa_kernels.h"
