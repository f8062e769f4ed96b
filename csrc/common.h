// What every kernel source shares: the host/device inline macro and the host-side check of
// an [N, C] operand.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host: CPU kernels call these from code compiled for AVX2/AVX-512
// (csrc/cpu/kd_loss_rows_<isa>.cpp) while the headers compile for the baseline; a real call
// would pass SIMD vectors under the baseline ABI, and a shared out-of-line copy could carry
// the wrong instruction set.
#define LF_HOST_DEVICE inline __attribute__((always_inline))
#else
#define LF_HOST_DEVICE inline
#endif

namespace lepton_fast {

// Row kernels read [N, C] logits whose rows are contiguous along C (any row stride).
inline void check_rows(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": ", name, " must be [N, C], contiguous along C");
}

}  // namespace lepton_fast
