// CPU kernel of sparse_kd_loss (schema: lepton_fast/ops/sparse_kd_loss.py), the contract of the
// reference kernel; the per-row maths is csrc/sparse_kd_loss.h (shared with the CUDA kernel),
// the buckets lepton_fast.reference.sparse_buckets'. This file checks, allocates and reduces;
// the rows run in parallel (at::parallel_for) in the row kernel of sparse_kd_loss_rows.h,
// vectorised with at::vec and compiled per instruction set (isa.h picks the build).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "grad_buffer.h"
#include "isa.h"
#include "sparse_kd_loss_cpu.h"

namespace lepton_fast {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& teacher_mask, const std::optional<at::Tensor>& labels,
    const at::Tensor& hyper, c10::string_view truncation, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  const char* op = "sparse_kd_loss";
  check_sparse_inputs(student_logits, teacher_indices, teacher_logprobs, teacher_mask, labels, truncation);
  const auto dtype = student_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": student_logits must be float32, float64, bfloat16 or float16, got ", dtype);
  const auto acc_type = at::toOpMathType(dtype);
  const int64_t n = student_logits.size(0), v = student_logits.size(1);
  SparseRows a{};
  a.p = make_kd_params(hyper, ignore_index, labels.has_value(), compute_grad);
  at::Tensor idx = teacher_indices.contiguous();
  at::Tensor lp = teacher_logprobs.to(acc_type).contiguous();
  at::Tensor mask = teacher_mask ? teacher_mask->contiguous() : at::Tensor();
  at::Tensor labels64;
  int64_t n_valid = n;
  if (labels) {
    labels64 = labels->contiguous();
    LF_CHECK_DTYPE(labels64, at::kLong);
    const int64_t* y = labels64.const_data_ptr<int64_t>();
    n_valid = 0;
    for (int64_t i = 0; i < n; ++i) {  // the labels' range, checked where they are read
      if (y[i] == ignore_index) continue;
      TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < v, op, ": labels must be in [0, ", v, ") or equal ignore_index=",
                        ignore_index, "; got ", y[i], " at row ", i);
      ++n_valid;
    }
  }
  const Reduction how = parse_reduction(reduction);
  double divisor = 1;
  if (num_items_in_batch) {
    divisor = scalar_arg(*num_items_in_batch, "num_items_in_batch");
  } else if (how == Reduction::kMean) {
    divisor = static_cast<double>(std::max<int64_t>(n_valid, 1));
  }
  auto rows = at::empty({n}, student_logits.options().dtype(acc_type));
  auto grad = compute_grad ? GradientBlockCache::get().empty_like(student_logits) : student_logits.new_empty({0});
  a.student = student_logits.const_data_ptr();
  a.indices = idx.const_data_ptr<int64_t>();
  a.logprobs = lp.const_data_ptr();
  a.mask = teacher_mask ? mask.const_data_ptr<bool>() : nullptr;
  a.labels = labels ? labels64.const_data_ptr<int64_t>() : nullptr;
  a.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  a.rows = rows.mutable_data_ptr();
  a.n_classes = v;
  a.k = idx.size(1);
  a.s_stride = student_logits.stride(0);
  a.dtype = dtype;
  a.stream_grad = stream_gradient(grad);  // false for the empty grad of compute_grad=False
  a.tail = truncation == "tail";
  a.grad_scale = how == Reduction::kNone || (how == Reduction::kSum && !num_items_in_batch) ? 1.0 : 1.0 / divisor;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(v, 1));
  const auto fn = pick_isa(&sparse_kd_rows_default, &sparse_kd_rows_avx2, &sparse_kd_rows_avx512);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  // A NaN row is an undefined softmax or bucket distribution (a check on the rows the kernel wrote).
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_rows", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_VALUE(!std::isnan(r[i]), op, ": a row of student_logits or teacher_logprobs is entirely -inf, or "
                        "holds +inf or NaN, so its softmax is undefined (row ", i, ")");
  });
  if (how == Reduction::kNone) return {rows, grad};
  double total = 0;  // serial, in double: deterministic whatever the thread count
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_sum", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) total += r[i];
  });
  return {at::scalar_tensor(how == Reduction::kSum && !num_items_in_batch ? total : total / divisor, rows.options()),
          grad};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("sparse_kd_loss", &cpu::sparse_kd_loss_cpu); }

}  // namespace lepton_fast
