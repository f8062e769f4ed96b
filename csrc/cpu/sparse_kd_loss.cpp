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

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cpu(const SparseKDLossCall& c) {
  const char* op = "sparse_kd_loss";
  const at::Tensor& student_logits = c.student_logits;
  const auto dtype = student_logits.scalar_type();
  const auto acc_type = at::toOpMathType(dtype);
  const int64_t n = student_logits.size(0), v = student_logits.size(1);
  int64_t n_valid = n;
  if (c.labels.defined()) {
    const int64_t* y = c.labels.const_data_ptr<int64_t>();
    n_valid = 0;
    for (int64_t i = 0; i < n; ++i) {  // the labels' range, checked where they are read
      if (y[i] == c.p.ignore_index) continue;
      TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < v, op, ": labels must be in [0, ", v, ") or equal ignore_index=",
                        c.p.ignore_index, "; got ", y[i], " at row ", i);
      ++n_valid;
    }
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
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_rows", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_VALUE(!std::isnan(r[i]), op, ": a row of student_logits or teacher_logprobs is entirely -inf, or "
                        "holds +inf or NaN, so its softmax is undefined (row ", i, ")");
  });
  if (c.how == Reduction::kNone) return {rows, grad};
  double total = 0;  // serial, in double: deterministic whatever the thread count
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_sum", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) total += r[i];
  });
  return {at::scalar_tensor(plain_sum ? total : total / divisor, rows.options()), grad};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("sparse_kd_loss", &sparse_kd_loss_entry<&cpu::sparse_kd_loss_cpu>); }

}  // namespace lepton_fast
