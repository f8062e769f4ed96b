// Autograd kernels of the fused losses, registered under the Autograd key (the pattern of
// torchvision's csrc/ops/autograd): the forward redispatches below autograd to the device
// kernel, which returns the loss and d(loss)/d(logits) together; the backward multiplies
// that saved gradient by grad_output in place (scale_grad_), so the whole backward is one
// launch that does nothing when grad_output is exactly 1. No Python runs per call.
//
// The saved gradient is a constant: the fused losses have no second derivative. A backward
// asked to build a graph (create_graph=True, as MAML-style inner loops and torch.func
// transforms do) therefore raises instead of silently dropping the Hessian term, and so does
// a second backward through the same graph (the first one scaled the buffer).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace lepton_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// The schemas (lepton_fast/ops/*.py) as C++ function types, for the typed dispatcher handles.
// The KD schemas take their hyper-parameters packed in one tensor (`hyper`, csrc/kd_loss.h), so
// a new one changes none of these.
using FusedKDLossFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&, int64_t, c10::string_view,
    const OptionalTensor&, bool);
using KDSliceLossFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&, const OptionalTensor&,
    const at::Tensor&, int64_t, c10::string_view, const OptionalTensor&, int64_t, int64_t, bool);
using SparseKDLossFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
    const at::Tensor&, c10::string_view, int64_t, c10::string_view, const OptionalTensor&, bool);
using PseudoLabelOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FusedPseudoLabelLossFn = PseudoLabelOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, bool, const OptionalTensor&,
                                                  const OptionalTensor&, c10::string_view, bool);

void scale_grad_(at::Tensor& grad, const at::Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lepton_fast::scale_grad_", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  op.call(grad, scale);
}

void check_forward(const at::Tensor& logits, bool compute_grad, const char* op) {
  TORCH_CHECK(compute_grad || !(at::GradMode::is_enabled() && logits.requires_grad()), op,
              ": compute_grad=False, but the logits require a gradient");
}

// d(loss)/d(logits) from the gradient the forward saved, or an undefined tensor when the
// loss took no part in the backward.
at::Tensor saved_gradient_times(AutogradContext* ctx, const at::Tensor& grad_loss, const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": a second-order gradient was asked for (create_graph=True, or a torch.func transform), but "
              "the fused kernel computes the first-order gradient during the forward and has no derivative "
              "of its own. Differentiate lepton_fast.reference.", op, " (plain autograd) for higher-order gradients.");
  TORCH_CHECK(ctx->saved_data.count("used") == 0, op,
              ": backward ran twice through the same graph (retain_graph=True); the first one consumed the "
              "gradient the forward wrote. Compute the loss again for another backward, or differentiate "
              "lepton_fast.reference.", op, ".");
  ctx->saved_data["used"] = true;
  at::Tensor grad = ctx->get_saved_variables()[0];
  if (!grad_loss.defined()) return {};
  if (grad.key_set().has(c10::DispatchKey::Python)) {
    // A tensor subclass: the fake and functional tensors of torch.compile's tracing, where
    // the saved gradient is also an output of the traced forward and must stay as it was
    // (the compiler plans the memory itself), or a DTensor. Out of place.
    const at::Tensor factor = grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(1);
    return (grad * factor).to(grad.scalar_type());
  }
  // Checked here too, before the dispatch: a dispatch to scale_grad_ just to learn there is nothing
  // to scale was ~2 us of a 64x10 call's ~30 us backward (benchmarks/RESULTS.md, fifth session).
  if (!is_cpu_one(grad_loss)) scale_grad_(grad, grad_loss);
  return grad;
}

// The KD losses, fused_kd_loss, kd_slice_loss and sparse_kd_loss: Op names the schema, whose first argument
// is the student's logits (the gradient flows there) and last compute_grad, and which
// returns (loss, grad).
template <typename Op>
class KDLoss : public torch::autograd::Function<KDLoss<Op>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student_logits, const Args&... args) {
    const bool compute_grad = std::get<sizeof...(Args) - 1>(std::tie(args...));
    check_forward(student_logits, compute_grad, Op::kName);
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Op::kQualName, "").template typed<typename Op::Fn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = op.call(student_logits, args...);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(Op::kInputs);
    grads[0] = saved_gradient_times(ctx, grad_outputs[0], Op::kName);
    return grads;
  }
};

struct FusedKDLossOp {
  static constexpr const char* kName = "fused_kd_loss";
  static constexpr const char* kQualName = "lepton_fast::fused_kd_loss";
  static constexpr int kInputs = 8;
  using Fn = FusedKDLossFn;
};

struct KDSliceLossOp {
  static constexpr const char* kName = "kd_slice_loss";
  static constexpr const char* kQualName = "lepton_fast::kd_slice_loss";
  static constexpr int kInputs = 12;
  using Fn = KDSliceLossFn;
};

struct SparseKDLossOp {
  static constexpr const char* kName = "sparse_kd_loss";
  static constexpr const char* kQualName = "lepton_fast::sparse_kd_loss";
  static constexpr int kInputs = 11;
  using Fn = SparseKDLossFn;
};

class FusedPseudoLabelLoss : public torch::autograd::Function<FusedPseudoLabelLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& strong_logits, const at::Tensor& weak_logits,
                               const at::Tensor& threshold, const at::Tensor& temperature, bool soft,
                               const OptionalTensor& class_thresholds,
                               const OptionalTensor& weights, c10::string_view reduction,
                               bool compute_grad) {
    check_forward(strong_logits, compute_grad, "fused_pseudo_label_loss");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lepton_fast::fused_pseudo_label_loss", "")
                               .typed<FusedPseudoLabelLossFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad, labels, confidence, mask, counts] = op.call(
        strong_logits, weak_logits, threshold, temperature, soft, class_thresholds, weights, reduction, compute_grad);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad, labels, confidence, mask, counts});
    ctx->set_materialize_grads(false);
    return {loss, grad, labels, confidence, mask, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(9);
    grads[0] = saved_gradient_times(ctx, grad_outputs[0], "fused_pseudo_label_loss");
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> fused_kd_loss_autograd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const OptionalTensor& labels,
    const at::Tensor& hyper, int64_t ignore_index, c10::string_view reduction, const OptionalTensor& num_items_in_batch,
    bool compute_grad) {
  auto out = KDLoss<FusedKDLossOp>::apply(student_logits, teacher_logits, labels, hyper, ignore_index, reduction,
                                          num_items_in_batch, compute_grad);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> kd_slice_loss_autograd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const OptionalTensor& labels,
    const at::Tensor& stats, const OptionalTensor& jsd_sums, const at::Tensor& hyper, int64_t ignore_index,
    c10::string_view reduction, const OptionalTensor& num_items_in_batch, int64_t class_offset, int64_t n_classes,
    bool compute_grad) {
  auto out = KDLoss<KDSliceLossOp>::apply(student_logits, teacher_logits, labels, stats, jsd_sums, hyper, ignore_index,
                                          reduction, num_items_in_batch, class_offset, n_classes, compute_grad);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_autograd(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const OptionalTensor& teacher_mask, const OptionalTensor& labels, const at::Tensor& hyper,
    c10::string_view truncation, int64_t ignore_index, c10::string_view reduction,
    const OptionalTensor& num_items_in_batch, bool compute_grad) {
  auto out = KDLoss<SparseKDLossOp>::apply(student_logits, teacher_indices, teacher_logprobs, teacher_mask, labels,
                                           hyper, truncation, ignore_index, reduction, num_items_in_batch,
                                           compute_grad);
  return {out[0], out[1]};
}

PseudoLabelOutputs fused_pseudo_label_loss_autograd(
    const at::Tensor& strong_logits, const at::Tensor& weak_logits, const at::Tensor& threshold,
    const at::Tensor& temperature, bool soft, const OptionalTensor& class_thresholds,
    const OptionalTensor& weights, c10::string_view reduction, bool compute_grad) {
  auto out = FusedPseudoLabelLoss::apply(strong_logits, weak_logits, threshold, temperature, soft, class_thresholds,
                                         weights, reduction, compute_grad);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, Autograd, m) {
  m.impl("fused_kd_loss", &fused_kd_loss_autograd);
  m.impl("kd_slice_loss", &kd_slice_loss_autograd);
  m.impl("fused_pseudo_label_loss", &fused_pseudo_label_loss_autograd);
  m.impl("sparse_kd_loss", &sparse_kd_loss_autograd);
}

}  // namespace lepton_fast
