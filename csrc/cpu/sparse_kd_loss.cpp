// CPU kernels of sparse_kd_loss and of its vocabulary-parallel split sparse_slice_stats /
// sparse_slice_grad (schemas: lepton_fast/ops/sparse_kd_loss.py), the contract of the
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

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cpu(const SparseKDLossCall& c) {
  const char* op = "sparse_kd_loss";
  const at::Tensor& student_logits = c.student_logits;
  const auto dtype = student_logits.scalar_type();
  const auto acc_type = at::toOpMathType(dtype);
  const int64_t n = student_logits.size(0), v = student_logits.size(1);
  int64_t n_valid = n;
  if (c.labels.defined()) {
    n_valid = count_valid_labels(op, c.labels.const_data_ptr<int64_t>(), n, v, c.p.ignore_index);
  }
  double divisor = 1;
  if (c.num_items_in_batch) {
    divisor = scalar_arg(*c.num_items_in_batch, "num_items_in_batch");
  } else if (c.how == Reduction::kMean) {
    divisor = static_cast<double>(std::max<int64_t>(n_valid, 1));
  }
  auto rows = at::empty({n}, student_logits.options().dtype(acc_type));
  auto grad = c.p.compute_grad ? GradientBlockCache::get().empty_like(student_logits) : student_logits.new_empty({0});
  SparseRows a{};
  a.p = c.p;
  a.student = student_logits.const_data_ptr();
  a.indices = c.indices.const_data_ptr<int64_t>();
  a.logprobs = c.logprobs.const_data_ptr();
  a.mask = c.mask.defined() ? c.mask.const_data_ptr<bool>() : nullptr;
  a.labels = c.labels.defined() ? c.labels.const_data_ptr<int64_t>() : nullptr;
  a.grad = c.p.compute_grad ? grad.mutable_data_ptr() : nullptr;
  a.rows = rows.mutable_data_ptr();
  a.n_classes = v;
  a.k = c.indices.size(1);
  a.s_stride = student_logits.stride(0);
  a.dtype = dtype;
  a.stream_grad = stream_gradient(grad);  // false for the empty grad of compute_grad=False
  a.tail = c.tail;
  const bool plain_sum = c.how == Reduction::kSum && !c.num_items_in_batch;
  a.grad_scale = c.how == Reduction::kNone || plain_sum ? 1.0 : 1.0 / divisor;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(v, 1));
  const auto fn = pick_isa(&sparse_kd_rows_default, &sparse_kd_rows_avx2, &sparse_kd_rows_avx512);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  // A NaN row is an undefined softmax or bucket distribution (a check on the rows the kernel wrote).
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_rows",
                             [&] { check_rows_defined<scalar_t>(rows, op, "student_logits or teacher_logprobs"); });
  if (c.how == Reduction::kNone) return {rows, grad};
  double total = 0;  // serial, in double: deterministic whatever the thread count
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_sum", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) total += r[i];
  });
  return {at::scalar_tensor(plain_sum ? total : total / divisor, rows.options()), grad};
}

// What both slice ops check and hand their row kernel: the [N, C] slice of rows of n_classes at
// class_offset, its entries' columns [N, K] and the labels (class ids of the whole row).
struct SliceLaunch {
  SparseSliceRows rows;
  at::Tensor column, labels64;
  at::ScalarType acc_type;
};

SliceLaunch prepare_slice(const char* op, const at::Tensor& student, const at::Tensor& column,
                          const std::optional<at::Tensor>& labels, const at::Tensor& hyper, int64_t ignore_index,
                          int64_t class_offset, int64_t n_classes) {
  check_sparse_student(op, student);
  const auto dtype = student.scalar_type();
  const int64_t n = student.size(0), c = student.size(1);
  TORCH_CHECK(column.dim() == 2 && column.size(0) == n, op, ": column must be [N, K]");
  LF_CHECK_DTYPE(column, at::kLong);
  LF_CHECK_DEVICE(column, student);
  TORCH_CHECK_VALUE(class_offset >= 0 && class_offset + c <= n_classes, op, ": a slice of ", c,
                    " columns at class_offset=", class_offset, " does not fit in n_classes=", n_classes);
  SliceLaunch launch;
  launch.column = column.contiguous();
  launch.acc_type = at::toOpMathType(dtype);
  if (labels) {
    LF_CHECK_SHAPE(*labels, n);
    LF_CHECK_DEVICE(*labels, student);
    launch.labels64 = labels->contiguous();
    LF_CHECK_DTYPE(launch.labels64, at::kLong);
  }
  SparseSliceRows& a = launch.rows;
  a = SparseSliceRows{};
  a.student = student.const_data_ptr();
  a.column = launch.column.const_data_ptr<int64_t>();
  a.labels = labels ? launch.labels64.const_data_ptr<int64_t>() : nullptr;
  a.slice_classes = c;
  a.k = column.size(1);
  a.s_stride = student.stride(0);
  a.class_offset = class_offset;
  a.n_classes = n_classes;
  a.dtype = dtype;
  a.p = make_kd_params(hyper, ignore_index, labels.has_value(), false);
  return launch;
}

template <typename Fn>
void run_slice_rows(const SparseSliceRows& a, int64_t n_rows, Fn baseline, Fn avx2, Fn avx512) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(a.slice_classes, 1));
  const auto fn = pick_isa(baseline, avx2, avx512);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

at::Tensor sparse_slice_stats_cpu(const at::Tensor& student_logits, const at::Tensor& column,
                                  const std::optional<at::Tensor>& labels, const at::Tensor& hyper,
                                  c10::string_view truncation, int64_t ignore_index, int64_t class_offset,
                                  int64_t n_classes) {
  const char* op = "sparse_slice_stats";
  TORCH_CHECK(truncation == "renormalize" || truncation == "tail", op, ": truncation must be 'renormalize' or 'tail'");
  SliceLaunch launch = prepare_slice(op, student_logits, column, labels, hyper, ignore_index, class_offset, n_classes);
  const int64_t n = student_logits.size(0);
  if (labels) count_valid_labels(op, launch.labels64.const_data_ptr<int64_t>(), n, n_classes, ignore_index);
  auto out = at::empty({n, kSpEntries + launch.rows.k}, student_logits.options().dtype(launch.acc_type));
  launch.rows.out = out.mutable_data_ptr();
  launch.rows.tail = truncation == "tail";
  run_slice_rows(launch.rows, n, &sparse_slice_stats_rows_default, &sparse_slice_stats_rows_avx2,
                 &sparse_slice_stats_rows_avx512);
  return out;
}

at::Tensor sparse_slice_grad_cpu(const at::Tensor& student_logits, const at::Tensor& column,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& coefficients,
                                 const at::Tensor& hyper, int64_t ignore_index, int64_t class_offset) {
  const char* op = "sparse_slice_grad";
  // The labels were checked by sparse_slice_stats; a label outside the slice has no column here.
  SliceLaunch launch = prepare_slice(op, student_logits, column, labels, hyper, ignore_index, class_offset,
                                     class_offset + student_logits.size(1));
  const int64_t n = student_logits.size(0);
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == n &&
                  coefficients.size(1) == kGrEntries + launch.rows.k && coefficients.is_contiguous(),
              op, ": coefficients must be a contiguous [N, ", kGrEntries, " + K] tensor, got ", coefficients.sizes());
  TORCH_CHECK(coefficients.scalar_type() == launch.acc_type, op, ": coefficients must be ", launch.acc_type,
              ", got ", coefficients.scalar_type());
  LF_CHECK_DEVICE(coefficients, student_logits);
  auto grad = GradientBlockCache::get().empty_like(student_logits);
  launch.rows.coefficients = coefficients.const_data_ptr();
  launch.rows.out = grad.mutable_data_ptr();
  launch.rows.stream_grad = stream_gradient(grad);
  run_slice_rows(launch.rows, n, &sparse_slice_grad_rows_default, &sparse_slice_grad_rows_avx2,
                 &sparse_slice_grad_rows_avx512);
  return grad;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) {
  m.impl("sparse_kd_loss", &sparse_kd_loss_entry<&cpu::sparse_kd_loss_cpu>);
  m.impl("sparse_slice_stats", &cpu::sparse_slice_stats_cpu);
  m.impl("sparse_slice_grad", &cpu::sparse_slice_grad_cpu);
}

}  // namespace lepton_fast
