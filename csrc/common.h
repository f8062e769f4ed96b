// What every kernel source shares: the host/device inline macro, the host-side checks as
// macros (as flash-attention's flash_api.cpp writes them), compile-time switches, and the
// reading of the 0-d hyper-parameter tensors the schemas take (lepton_fast/ops/__init__.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host: CPU kernels call these from code compiled for AVX2/AVX-512
// (csrc/cpu/isa_<isa>.cpp) while the headers compile for the baseline; a real call would
// pass SIMD vectors under the baseline ABI, and a shared out-of-line copy could carry the
// wrong instruction set.
#define LF_HOST_DEVICE inline __attribute__((always_inline))
#else
#define LF_HOST_DEVICE inline
#endif

// Host-side checks of a kernel's tensors. They guard the kernel's own invariants; the
// Python layer has already checked the user's arguments and named them.
#define LF_CHECK_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), #x " must be on the device of " #ref ", got ", (x).device())
#define LF_CHECK_SHAPE(x, ...) \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ ")")
#define LF_CHECK_ROWS(x) \
  TORCH_CHECK((x).dim() == 2 && (x).stride(1) == 1, #x " must be [N, C] with rows contiguous along C")
#define LF_CHECK_DTYPE(x, dtype) TORCH_CHECK((x).scalar_type() == (dtype), #x " must be ", dtype, ", got ", (x).scalar_type())

// BOOL_SWITCH(cond, kName, ...): runs the lambda body with `constexpr bool kName = cond`, so a
// run-time flag selects one of two compiled specialisations (flash-attention's idiom).
#define BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                     \
    if (COND) {                             \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                 \
    }                                       \
  }()

namespace lepton_fast {

// The value of a 0-d hyper-parameter tensor: float64 on the CPU as the Python layer makes
// it (a read from host memory, never a device synchronisation).
inline double scalar_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), name, " must be a 0-d CPU tensor");
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : t.item<double>();
}

// How a "mean" or num_items_in_batch divides the summed loss.
enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK(reduction == "mean" || reduction == "batchmean", "reduction must be 'mean', 'batchmean', 'sum' or 'none'");
  return Reduction::kMean;
}

}  // namespace lepton_fast
