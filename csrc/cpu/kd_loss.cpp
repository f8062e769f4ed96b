// CPU fused_kd_loss: tensor checks, the label and row checks, outputs, rows in parallel,
// and the choice of the row kernel's instruction set (kd_loss_rows.h, compiled once per
// ISA in isa_<isa>.cpp, picked with ATen's own at::get_cpu_capability(): see isa.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "grad_buffer.h"
#include "isa.h"
#include "kd_loss_cpu.h"

namespace lepton_fast {
namespace cpu {
namespace {

// The labels' range, checked where they are read (the CUDA kernel asserts the same), and the
// count of rows a "mean" divides by.
int64_t count_valid_labels(const int64_t* labels, int64_t n_rows, int64_t n_classes, int64_t ignore_index) {
  int64_t valid = 0;
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = labels[i];
    if (y == ignore_index) continue;
    TORCH_CHECK_VALUE(y >= 0 && y < n_classes, "fused_kd_loss: labels must be in [0, ", n_classes,
                      ") or equal ignore_index=", ignore_index, "; got ", y, " at row ", i);
    ++valid;
  }
  return valid;
}

template <typename acc_t>
at::Tensor reduce_rows(const at::Tensor& rows, Reduction reduction, double divisor) {
  if (reduction == Reduction::kNone) return rows;
  // A serial sum in double: deterministic whatever the thread count, and exact enough for
  // any N that fits in memory.
  const acc_t* r = rows.const_data_ptr<acc_t>();
  double total = 0;
  for (int64_t i = 0; i < rows.numel(); ++i) total += r[i];
  return at::scalar_tensor(total / divisor, rows.options());
}

std::tuple<at::Tensor, at::Tensor> fused_kd_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& temperature, const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& label_smoothing,
    c10::string_view divergence, int64_t ignore_index, bool scale_by_t2, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  check_kd_inputs(student_logits, teacher_logits, labels);
  const auto dtype = student_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_kd_loss: logits must be float32, float64, bfloat16 or float16, got ", dtype);
  const KDParams p = make_kd_params(temperature, beta, alpha, label_smoothing, divergence, ignore_index, scale_by_t2,
                                    labels.has_value(), compute_grad);
  const Reduction how = parse_reduction(reduction);
  const int64_t n_rows = student_logits.size(0), n_classes = student_logits.size(1);
  at::Tensor labels64;
  int64_t n_valid = n_rows;
  if (labels) {
    labels64 = labels->contiguous();
    LF_CHECK_DTYPE(labels64, at::kLong);
    n_valid = count_valid_labels(labels64.const_data_ptr<int64_t>(), n_rows, n_classes, ignore_index);
  }
  double divisor = 1;
  if (num_items_in_batch) {
    divisor = scalar_arg(*num_items_in_batch, "num_items_in_batch");
  } else if (how == Reduction::kMean) {
    divisor = static_cast<double>(std::max<int64_t>(n_valid, 1));
  }

  const auto acc_type = at::toOpMathType(dtype);
  auto rows = at::empty({n_rows}, student_logits.options().dtype(acc_type));
  auto grad = compute_grad ? GradientBlockCache::get().empty_like(student_logits)
                           : at::empty({0}, student_logits.options());
  KDRows a{student_logits.const_data_ptr(), teacher_logits.const_data_ptr(),
           labels ? labels64.const_data_ptr<int64_t>() : nullptr, compute_grad ? grad.data_ptr() : nullptr,
           rows.data_ptr(), n_classes, student_logits.stride(0), teacher_logits.stride(0), dtype, p,
           how == Reduction::kNone ? 1.0 : 1.0 / divisor};
  // Rows are independent; a task of at least ~64k elements keeps scheduling cost negligible.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n_classes, 1));
  const auto fn = pick_isa(&kd_rows_default, &kd_rows_avx2, &kd_rows_avx512);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });

  return AT_DISPATCH_FLOATING_TYPES(acc_type, "fused_kd_loss_cpu", [&] {
    // A row whose softmax is undefined (entirely -inf, or +inf / NaN in it) came out NaN.
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n_rows; ++i) {
      TORCH_CHECK_VALUE(!std::isnan(r[i]), "fused_kd_loss: row ", i, " of student_logits or teacher_logits is "
                        "entirely -inf, or holds +inf or NaN, so its softmax is undefined");
    }
    return std::make_tuple(reduce_rows<scalar_t>(rows, how, divisor), grad);
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("fused_kd_loss", &cpu::fused_kd_loss_cpu); }

}  // namespace lepton_fast
