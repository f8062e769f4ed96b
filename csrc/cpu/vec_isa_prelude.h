// Include first in a file that compiles at::vec code for one instruction set
// (isa_avx2.cpp, ...). Everything at::vec includes from outside its own headers is
// included here, before that file switches the instruction set with `#pragma GCC target`,
// so these inline functions compile for baseline x86-64 in every file. at::vec itself lives
// in a namespace named after CPU_CAPABILITY and the kernels in anonymous namespaces, so no
// AVX2/AVX-512 copy of an inline function can be picked by the linker for code that runs on
// a CPU without it.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>

// x86-64 with GCC: the ISA files compile their kernels for AVX2/AVX-512. Elsewhere (other
// compilers, other architectures) they forward to the portable kernel.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LF_X86_ISA_FILES 1
#else
#define LF_X86_ISA_FILES 0
#endif
