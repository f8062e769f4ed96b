// Pseudo-labels (FixMatch): the per-row math shared by the CPU and CUDA kernels.
// One row, weak view w, strong view s, z = w / T:
//   label y = argmax z (ties: lowest index), confidence c = max softmax(z) = 1 / sum_j exp(z_j - max z)
//   selected = c >= threshold, or c >= class_thresholds[y]; row weight = weights[row] or selected
//   hard:  loss = weight * (lse(s) - s_y),                 d/ds_j = weight * (p_j - [j == y])
//   soft:  loss = weight * (lse(s) - sum_j q_j s_j),       d/ds_j = weight * (p_j - q_j)
// with p = softmax(s) (T = 1), q = softmax(z). A row of weight 0 has loss 0 and gradient 0,
// whatever its strong view holds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "common.h"

namespace lepton_fast {

// The scalar arguments of the pseudo-label kernels (values checked in Python: threshold in
// [0, 1], temperature > 0), resolved once per call in double precision.
struct PseudoLabelParams {
  double inv_temperature;
  double threshold;
  double grad_scale;  // multiplies the gradient: 1 / N for a mean, else 1
  bool soft;
  bool compute_grad;
};

inline PseudoLabelParams make_pseudo_label_params(const at::Tensor& threshold, const at::Tensor& temperature,
                                                  bool soft, bool compute_grad, double grad_scale) {
  return {1.0 / scalar_arg(temperature, "temperature"), scalar_arg(threshold, "threshold"), grad_scale, soft,
          compute_grad};
}

// The checks of the tensors that the CPU and CUDA kernels share (their values were checked in
// Python). `weak_logits` is select_pseudo_labels' logits, and `strong_logits` nullptr there.
inline void check_pseudo_label_inputs(const char* op, const at::Tensor& weak_logits, const at::Tensor* strong_logits,
                                      const std::optional<at::Tensor>& class_thresholds,
                                      const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(weak_logits.dim() == 2 && weak_logits.stride(1) == 1, op,
              ": logits must be [N, C] with rows contiguous along C");
  const auto dtype = weak_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, float64, bfloat16 or float16, got ", dtype);
  if (strong_logits != nullptr) {
    TORCH_CHECK(strong_logits->stride(1) == 1 && strong_logits->sizes() == weak_logits.sizes() &&
                    strong_logits->scalar_type() == dtype && strong_logits->device() == weak_logits.device(),
                op, ": strong_logits and weak_logits must have the same shape, dtype and device");
  }
  TORCH_CHECK(!class_thresholds || (class_thresholds->dim() == 1 && class_thresholds->size(0) == weak_logits.size(1) &&
                                    class_thresholds->device() == weak_logits.device()),
              op, ": class_thresholds must be [C] on the logits' device");
  TORCH_CHECK(!weights || (weights->dim() == 1 && weights->size(0) == weak_logits.size(0) &&
                           weights->device() == weak_logits.device()),
              op, ": weights must be [N] on the logits' device");
}

// fused_pseudo_label_loss's arguments as the CPU and CUDA kernels read them: checked, with the
// reduction, its divisor and the kernel's parameters. "mean" divides by every row, selected or
// not (FixMatch's unlabeled loss), at least 1 so that an empty batch has loss 0; the gradient
// is written already scaled by 1 / divisor.
struct PseudoLabelLossCall {
  const at::Tensor& strong_logits;
  const at::Tensor& weak_logits;
  const std::optional<at::Tensor>& class_thresholds;
  const std::optional<at::Tensor>& weights;
  Reduction how;
  double divisor;
  PseudoLabelParams p;
};

using PseudoLabelLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The schema's C++ signature, written once for every device: the checks and parameters the
// kernels share, then `kernel`, the device's part; each device registers
// fused_pseudo_label_loss_entry<its kernel>.
template <PseudoLabelLossOutputs (*kernel)(const PseudoLabelLossCall&)>
PseudoLabelLossOutputs fused_pseudo_label_loss_entry(const at::Tensor& strong_logits, const at::Tensor& weak_logits,
                                                     const at::Tensor& threshold, const at::Tensor& temperature,
                                                     bool soft, const std::optional<at::Tensor>& class_thresholds,
                                                     const std::optional<at::Tensor>& weights,
                                                     c10::string_view reduction, bool compute_grad) {
  check_pseudo_label_inputs("fused_pseudo_label_loss", weak_logits, &strong_logits, class_thresholds, weights);
  const Reduction how = parse_reduction(reduction);
  const double divisor = static_cast<double>(std::max<int64_t>(strong_logits.size(0), 1));
  return kernel({strong_logits, weak_logits, class_thresholds, weights, how, divisor,
                 make_pseudo_label_params(threshold, temperature, soft, compute_grad,
                                          how == Reduction::kMean ? 1.0 / divisor : 1.0)});
}

// max softmax = exp(max - max) / sum = 1 / sum (the exponent at the max is exactly 0:
// ArgmaxSoftmax subtracts the max before scaling), never above 1.
template <typename acc_t>
LF_HOST_DEVICE acc_t confidence_from_sum(acc_t max, acc_t sum) {
  return softmax_defined(max, sum) ? acc_t(1) / sum : std::numeric_limits<acc_t>::quiet_NaN();
}

// Online arg-max and softmax statistics of z = x * scale (scale = 1 / T > 0): running max of
// x, sum of exp((x - max x) * scale) (the max subtracted before the scaling: log_sum in
// common.h), index of the max. The arg-max is that of x, as given: the max of
// z is max(x) * scale, and the first maximum of x is the one a float64 reference finds even
// where rounding makes two z equal. A tie keeps the lower index, in add and in merge. -inf
// entries (masked classes) add nothing, also before the first finite one, and a NaN entry
// makes the sum NaN, so that the caller reports the row.
template <typename acc_t>
struct ArgmaxSoftmax {
  acc_t scale = 1;
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;
  int64_t arg = 0;

  LF_HOST_DEVICE void add(acc_t x, int64_t j) {
    if (x > max) {
      sum = sum * std::exp((max - x) * scale) + acc_t(1);
      max = x;
      arg = j;
    } else if (x != -std::numeric_limits<acc_t>::infinity()) {
      sum += std::exp((x - max) * scale);
    }
  }
  LF_HOST_DEVICE void merge(const ArgmaxSoftmax& o) {
    if (o.max > max || (o.max == max && o.arg < arg)) arg = o.arg;
    if (o.max > max) {
      sum = sum * std::exp((max - o.max) * scale) + o.sum;
      max = o.max;
    } else if (o.max != -std::numeric_limits<acc_t>::infinity()) {
      sum += o.sum * std::exp((o.max - max) * scale);
    } else {
      sum += o.sum;  // 0, or NaN to pass on
    }
  }
  // log softmax(z)_j = (x_j - max) * scale - log_sum(max, sum) (common.h).
  LF_HOST_DEVICE acc_t log_prob(acc_t x, acc_t log_sum_) const { return (x - max) * scale - log_sum_; }
};

// The row's weight: weights[row] when given, else 1 if selected, else 0. Thresholds in the
// accumulation type, compared as the reference compares them.
template <typename acc_t>
LF_HOST_DEVICE acc_t row_weight(acc_t confidence, int64_t label, const acc_t* class_thresholds,
                                const acc_t* weights, int64_t row, acc_t threshold, bool* selected) {
  const acc_t cut = class_thresholds ? class_thresholds[label] : threshold;
  *selected = confidence >= cut;
  return weights ? weights[row] : acc_t(*selected ? 1 : 0);
}

// q_j s_j with 0 * (-inf) = 0: a class the target rules out contributes nothing.
template <typename acc_t>
LF_HOST_DEVICE acc_t target_term(acc_t q, acc_t s) {
  return q == acc_t(0) ? acc_t(0) : q * s;
}

}  // namespace lepton_fast
