// Pseudo-labels (FixMatch): the per-row math shared by the CPU and CUDA kernels.
// One row, weak view w, strong view s, z = w / T:
//   label y = argmax z (ties: lowest index), confidence c = max softmax(z) = 1 / sum_j exp(z_j - max z)
//   selected = c >= threshold, or c >= class_thresholds[y]; row weight = weights[row] or selected
//   hard:  loss = weight * (lse(s) - s_y),                 d/ds_j = weight * (p_j - [j == y])
//   soft:  loss = weight * (lse(s) - sum_j q_j s_j),       d/ds_j = weight * (p_j - q_j)
// with p = softmax(s) (T = 1), q = softmax(z). A row of weight 0 has loss 0 and gradient 0.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace lepton_fast {

// The scalar arguments of the pseudo-label kernels (values checked in Python: threshold in
// [0, 1], temperature > 0).
struct PseudoLabelParams {
  double inv_temperature;
  double threshold;
  bool soft;
  bool compute_grad;
};

// The checks of the two views that the CPU and CUDA loss kernels share.
inline void check_views(const at::Tensor& strong_logits, const at::Tensor& weak_logits) {
  LF_CHECK_ROWS(strong_logits);
  LF_CHECK_ROWS(weak_logits);
  TORCH_CHECK(strong_logits.sizes() == weak_logits.sizes() && strong_logits.scalar_type() == weak_logits.scalar_type(),
              "fused_pseudo_label_loss: strong_logits and weak_logits must have the same shape and dtype");
  LF_CHECK_DEVICE(weak_logits, strong_logits);
}

inline PseudoLabelParams make_pseudo_label_params(const at::Tensor& threshold, const at::Tensor& temperature,
                                                  bool soft, bool compute_grad) {
  return {1.0 / scalar_arg(temperature, "temperature"), scalar_arg(threshold, "threshold"), soft, compute_grad};
}

// Online arg-max and softmax statistics: running max, sum of exp(x - max), index of the
// max (a tie keeps the lower index, in add and in merge). -inf entries (masked classes) add
// nothing, also before the first finite one, and a NaN entry makes the sum NaN, so that the
// caller reports the row.
template <typename acc_t>
struct ArgmaxSoftmax {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;
  int64_t arg = 0;

  LF_HOST_DEVICE void add(acc_t x, int64_t j) {
    if (x > max) {
      sum = sum * std::exp(max - x) + acc_t(1);
      max = x;
      arg = j;
    } else if (x != -std::numeric_limits<acc_t>::infinity()) {
      sum += std::exp(x - max);
    }
  }
  LF_HOST_DEVICE void merge(const ArgmaxSoftmax& o) {
    if (o.max > max || (o.max == max && o.arg < arg)) arg = o.arg;
    if (o.max > max) {
      sum = sum * std::exp(max - o.max) + o.sum;
      max = o.max;
    } else if (o.max != -std::numeric_limits<acc_t>::infinity()) {
      sum += o.sum * std::exp(o.max - max);
    } else {
      sum += o.sum;  // 0, or NaN to pass on
    }
  }
};

// max softmax = exp(max - max) / sum = 1 / sum; NaN for an all -inf row (sum = 0, max = -inf).
template <typename acc_t>
LF_HOST_DEVICE acc_t confidence_from_sum(acc_t max, acc_t sum) {
  return max == -std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN()
                                                          : acc_t(1) / sum;
}

// The row's weight: weights[row] when given, else 1 if selected, else 0.
template <typename acc_t>
LF_HOST_DEVICE acc_t row_weight(acc_t confidence, int64_t label, const float* class_thresholds,
                                const acc_t* weights, int64_t row, double threshold, bool* selected) {
  const acc_t cut = class_thresholds ? acc_t(class_thresholds[label]) : acc_t(threshold);
  *selected = confidence >= cut;
  return weights ? weights[row] : acc_t(*selected ? 1 : 0);
}

// Cross-entropy of softmax(s) against the target: hard (target_dot = s_y) or soft (sum_j q_j s_j).
template <typename acc_t>
LF_HOST_DEVICE acc_t pseudo_label_ce(acc_t lse_strong, acc_t target_dot) {
  return lse_strong - target_dot;
}

// q_j s_j with 0 * (-inf) = 0: a class the target rules out contributes nothing.
template <typename acc_t>
LF_HOST_DEVICE acc_t target_term(acc_t q, acc_t s) {
  return q == acc_t(0) ? acc_t(0) : q * s;
}

// d(weight * CE)/ds_j already multiplied by grad_scale: gw * (p_j - target_j).
template <typename T>
LF_HOST_DEVICE T pseudo_label_grad(T p, T target, T gw) {
  return gw * (p - target);
}

}  // namespace lepton_fast
