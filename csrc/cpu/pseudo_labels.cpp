// CPU select_pseudo_labels and fused_pseudo_label_loss: tensor checks, outputs, rows in
// parallel, the checks of the rows, the class counts and the reduction, and the choice of the
// row kernel's instruction set (pseudo_labels_rows.h, compiled once per ISA in
// isa_<isa>.cpp, picked with ATen's own at::get_cpu_capability(): see isa.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "grad_buffer.h"
#include "isa.h"
#include "pseudo_labels_cpu.h"

namespace lepton_fast {
namespace cpu {
namespace {

// An optional [C] or [N] argument in the accumulation type, contiguous (a no-op when it
// already is, as the Python layer makes it).
at::Tensor acc_contiguous(const std::optional<at::Tensor>& t, at::ScalarType acc_type) {
  return t ? t->to(acc_type).contiguous() : at::Tensor();
}

// Runs the row kernel over every row; `a` has its pointers set, except the outputs common to
// both ops, which this allocates and returns: labels, confidence, mask.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_rows(PseudoLabelRows& a, const at::Tensor& weak) {
  const int64_t n_rows = weak.size(0);
  auto labels = at::empty({n_rows}, weak.options().dtype(at::kLong));
  auto confidence = at::empty({n_rows}, weak.options().dtype(at::toOpMathType(weak.scalar_type())));
  auto mask = at::empty({n_rows}, weak.options().dtype(at::kBool));
  a.labels = labels.data_ptr<int64_t>();
  a.confidence = confidence.data_ptr();
  a.mask = mask.data_ptr<bool>();
  // Rows are independent; a task of at least ~64k elements keeps scheduling cost negligible.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(a.n_classes, 1));
  const auto fn = pick_isa(&pseudo_label_rows_default, &pseudo_label_rows_avx2, &pseudo_label_rows_avx512);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  return {labels, confidence, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_pseudo_labels_cpu(
    const at::Tensor& logits, const at::Tensor& threshold, const at::Tensor& temperature,
    const std::optional<at::Tensor>& class_thresholds) {
  check_pseudo_label_inputs("select_pseudo_labels", logits, nullptr, class_thresholds, std::nullopt);
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  const at::Tensor thresholds = acc_contiguous(class_thresholds, acc_type);
  PseudoLabelRows a{};
  a.weak = logits.const_data_ptr();
  a.class_thresholds = thresholds.defined() ? thresholds.const_data_ptr() : nullptr;
  a.n_classes = logits.size(1);
  a.weak_stride = logits.stride(0);
  a.dtype = logits.scalar_type();
  a.p = make_pseudo_label_params(threshold, temperature, false, false, 1.0);
  auto out = run_rows(a, logits);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "select_pseudo_labels_cpu", [&] {
    check_rows_defined<scalar_t>(std::get<1>(out), "select_pseudo_labels", "logits");
  });
  return out;
}

PseudoLabelLossOutputs fused_pseudo_label_loss_cpu(const PseudoLabelLossCall& call) {
  constexpr const char* op = "fused_pseudo_label_loss";
  const at::Tensor &strong_logits = call.strong_logits, &weak_logits = call.weak_logits;
  const int64_t n_rows = strong_logits.size(0), n_classes = strong_logits.size(1);
  const auto acc_type = at::toOpMathType(strong_logits.scalar_type());
  const at::Tensor thresholds = acc_contiguous(call.class_thresholds, acc_type);
  const at::Tensor row_weights = acc_contiguous(call.weights, acc_type);
  auto rows = at::empty({n_rows}, strong_logits.options().dtype(acc_type));
  auto grad = call.p.compute_grad ? GradientBlockCache::get().empty_like(strong_logits)
                                : at::empty({0}, strong_logits.options());
  PseudoLabelRows a{};
  a.strong = strong_logits.const_data_ptr();
  a.weak = weak_logits.const_data_ptr();
  a.class_thresholds = thresholds.defined() ? thresholds.const_data_ptr() : nullptr;
  a.weights = row_weights.defined() ? row_weights.const_data_ptr() : nullptr;
  a.grad = call.p.compute_grad ? grad.data_ptr() : nullptr;
  a.stream_grad = stream_gradient(grad);  // false for the empty grad of compute_grad=False
  a.loss = rows.data_ptr();
  a.n_classes = n_classes;
  a.strong_stride = strong_logits.stride(0);
  a.weak_stride = weak_logits.stride(0);
  a.dtype = strong_logits.scalar_type();
  a.p = call.p;
  auto [labels, confidence, mask] = run_rows(a, weak_logits);

  auto counts = at::zeros({n_classes}, labels.options());
  at::Tensor loss = AT_DISPATCH_FLOATING_TYPES(acc_type, "fused_pseudo_label_loss_cpu", [&] {
    check_rows_defined<scalar_t>(confidence, op, "weak_logits");
    check_rows_defined<scalar_t>(rows, op, "strong_logits");
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const bool* m = mask.const_data_ptr<bool>();
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    int64_t* n_selected = counts.data_ptr<int64_t>();
    // A serial sum in double: deterministic whatever the thread count.
    double total = 0;
    for (int64_t row = 0; row < n_rows; ++row) {
      n_selected[y[row]] += m[row];
      total += r[row];
    }
    if (call.how == Reduction::kNone) return rows;
    return at::scalar_tensor(call.how == Reduction::kMean ? total / call.divisor : total, rows.options());
  });
  return {loss, grad, labels, confidence, mask, counts};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) {
  m.impl("select_pseudo_labels", &cpu::select_pseudo_labels_cpu);
  m.impl("fused_pseudo_label_loss", &fused_pseudo_label_loss_entry<&cpu::fused_pseudo_label_loss_cpu>);
}

}  // namespace lepton_fast
