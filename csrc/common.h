// What every kernel source shares: the host/device inline macro, the host-side checks as
// macros (as flash-attention's flash_api.cpp writes them), compile-time switches, and the
// reading of the 0-d hyper-parameter tensors the schemas take (lepton_fast/ops/__init__.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

// The labels' range, checked where a CPU kernel reads them (the CUDA kernels assert the same),
// and the count of rows a "mean" divides by: those whose label is not ignore_index.
inline int64_t count_valid_labels(const char* op, const int64_t* labels, int64_t n_rows, int64_t n_classes,
                                  int64_t ignore_index) {
  int64_t valid = 0;
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = labels[i];
    if (y == ignore_index) continue;
    TORCH_CHECK_VALUE(y >= 0 && y < n_classes, op, ": labels must be in [0, ", n_classes, ") or equal ignore_index=",
                      ignore_index, "; got ", y, " at row ", i);
    ++valid;
  }
  return valid;
}

// A row whose softmax is undefined (entirely -inf, or +inf / NaN in it) comes out of a CPU
// kernel as a NaN row value; the error names the row and `names`, the inputs to blame, in the
// words of the Python kernels' check (lepton_fast._validate.rows_defined).
template <typename acc_t>
void check_rows_defined(const at::Tensor& rows, const char* op, const char* names) {
  const acc_t* r = rows.const_data_ptr<acc_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK_VALUE(!std::isnan(r[i]), op, ": row ", i, " of ", names,
                      " is entirely -inf, or holds +inf or NaN, so its softmax is undefined");
  }
}

// The value of a 0-d hyper-parameter tensor: float64 on the CPU as the Python layer makes
// it (a read from host memory, never a device synchronisation).
inline double scalar_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), name, " must be a 0-d CPU tensor");
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : t.item<double>();
}

// A row's softmax is defined when its max is finite and its sum positive: an entirely -inf row
// (sum 0, or max -inf), a +inf entry (inf - inf) or a NaN give NaN, which the kernels report
// naming the argument. The CPU's vector exp maps NaN to a number, so the max decides, not the
// sum (the CPU's running max keeps a NaN).
template <typename acc_t>
LF_HOST_DEVICE bool softmax_defined(acc_t max, acc_t sum) {
  return max > -std::numeric_limits<acc_t>::infinity() && max < std::numeric_limits<acc_t>::infinity() &&
         sum > acc_t(0);
}

// The softmax statistics of z = x / T are the max of the raw x and sum = sum_j exp((x_j - max) / T):
// the max is subtracted before the scaling, so that the exponent is exactly 0 at the max for any T
// (x / T - max(x / T) would subtract rounded values: at T = 1e-8 a float32 z ~ 1e8 is off by up
// to 4, and its exp by a factor of 55). Every kernel agrees with the float64 oracle over the
// documented range T in [1e-8, 1e4]. log_sum is then lse(z) - max / T, and log softmax(z)_j =
// (x_j - max) / T - log_sum; NaN where the softmax is undefined.
template <typename acc_t>
LF_HOST_DEVICE acc_t log_sum(acc_t max, acc_t sum) {
  return softmax_defined(max, sum) ? std::log(sum) : std::numeric_limits<acc_t>::quiet_NaN();
}

// logsumexp at T = 1 (the cross-entropies) from the max and its sum; NaN where undefined.
template <typename acc_t>
LF_HOST_DEVICE acc_t lse_from_sum(acc_t max, acc_t sum) {
  return softmax_defined(max, sum) ? max + std::log(sum) : std::numeric_limits<acc_t>::quiet_NaN();
}

// How a "mean" or num_items_in_batch divides the summed loss.
enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK(reduction == "mean" || reduction == "batchmean", "reduction must be 'mean', 'batchmean', 'sum' or 'none'");
  return Reduction::kMean;
}

// A 0-d CPU float32/float64 tensor that is exactly 1, read in place: a loss's usual grad_output,
// with which the backward's scale_grad_ has nothing to do (the autograd kernels check it
// before dispatching scale_grad_, its CPU kernel for every other caller).
inline bool is_cpu_one(const at::Tensor& scale) {
  if (!scale.is_cpu() || scale.dim() != 0 || scale.key_set().has(c10::DispatchKey::Python)) return false;
  if (scale.scalar_type() == at::kFloat) return *scale.const_data_ptr<float>() == 1.0f;
  if (scale.scalar_type() == at::kDouble) return *scale.const_data_ptr<double>() == 1.0;
  return false;
}

}  // namespace lepton_fast
