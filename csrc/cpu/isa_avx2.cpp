// The CPU row kernels for AVX2 + FMA (+F16C), chosen at run time when ATen reports AVX2 (isa.h).
#include "vec_isa_prelude.h"
#include "row_kernels.h"
// (both compile for the baseline, see vec_isa_prelude.h)

#define LF_ISA avx2
#if LF_X86_ISA_FILES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the ISA macros after a target pragma; sleef.h declares its vector
// functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "isa_kernels.h"
#pragma GCC pop_options
#else
#define LF_ISA_FALLBACK
#include "isa_kernels.h"
#endif
