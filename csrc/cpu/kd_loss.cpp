// CPU kernels of fused_kd_loss and the kd_slice_* ops (schemas in lepton_fast/ops/kd_loss.py): tensor
// checks, the label and row checks, outputs, rows in parallel, and the choice of the row
// kernel's instruction set (kd_loss_rows.h, compiled once per ISA in isa_<isa>.cpp, picked
// with ATen's own at::get_cpu_capability(): see isa.h).
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

// The part every op shares: the checks of the logits and labels, and the row kernel's
// arguments for a slice of `n_classes`-column rows starting at class_offset. Labels are
// class ids of the whole row; their range is checked unless n_classes is 0 (kJSDSums, which
// reads them only to skip ignored rows, after kd_slice_stats checked them).
struct KDLaunch {
  KDRows rows;
  at::Tensor labels64;
  int64_t n_valid;  // rows whose label is not ignore_index
  at::ScalarType acc_type;
};

KDLaunch prepare(const char* op, KDMode mode, const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, const KDParams& p, int64_t class_offset,
                 int64_t n_classes) {
  check_kd_inputs(op, student, teacher, labels, class_offset, n_classes);
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, float64, bfloat16 or float16, got ", dtype);
  const int64_t n_rows = student.size(0), slice_classes = student.size(1);
  KDLaunch launch;
  launch.n_valid = n_rows;
  if (labels) {
    launch.labels64 = labels->contiguous();
    LF_CHECK_DTYPE(launch.labels64, at::kLong);
    if (n_classes > 0) {
      launch.n_valid =
          count_valid_labels(op, launch.labels64.const_data_ptr<int64_t>(), n_rows, n_classes, p.ignore_index);
    }
  }
  launch.acc_type = at::toOpMathType(dtype);
  launch.rows = KDRows{mode, student.const_data_ptr(), teacher.const_data_ptr(),
                       labels ? launch.labels64.const_data_ptr<int64_t>() : nullptr, nullptr, nullptr, nullptr, nullptr,
                       nullptr, slice_classes, class_offset, n_classes, student.stride(0), teacher.stride(0), dtype, p,
                       1.0, false};
  return launch;
}

void run_rows(const KDRows& a, int64_t n_rows) {
  // Rows are independent; a task of at least ~64k elements keeps scheduling cost negligible.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(a.slice_classes, 1));
  const auto fn = pick_isa(&kd_rows_default, &kd_rows_avx2, &kd_rows_avx512);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// The row losses and gradient of fused_kd_loss (kFused) or kd_slice_loss (kSlice), reduced.
std::tuple<at::Tensor, at::Tensor> loss_and_grad(
    const char* op, KDMode mode, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor* stats, const std::optional<at::Tensor>& jsd_sums,
    const at::Tensor& hyper, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, int64_t class_offset, int64_t n_classes,
    bool compute_grad) {
  const KDParams p = make_kd_params(hyper, ignore_index, labels.has_value(), compute_grad);
  KDLaunch launch = prepare(op, mode, student_logits, teacher_logits, labels, p, class_offset, n_classes);
  KDRows& a = launch.rows;
  if (stats) {
    check_merged_stats(op, *stats, student_logits, kNumKDStats);
    a.stats = stats->const_data_ptr();
    if (p.needs_soft && p.divergence == Divergence::kJSD) {
      TORCH_CHECK(jsd_sums.has_value(), op, ": the JSD needs jsd_sums");
      check_merged_stats(op, *jsd_sums, student_logits, 2);
      a.jsd = jsd_sums->const_data_ptr();
    }
  }
  const Reduction how = parse_reduction(reduction);
  double divisor = 1;
  if (num_items_in_batch) {
    divisor = scalar_arg(*num_items_in_batch, "num_items_in_batch");
  } else if (how == Reduction::kMean) {
    divisor = static_cast<double>(std::max<int64_t>(launch.n_valid, 1));
  }
  const int64_t n_rows = student_logits.size(0);
  auto rows = at::empty({n_rows}, student_logits.options().dtype(launch.acc_type));
  auto grad = compute_grad ? GradientBlockCache::get().empty_like(student_logits)
                           : at::empty({0}, student_logits.options());
  a.loss = rows.data_ptr();
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.grad_scale = how == Reduction::kNone ? 1.0 : 1.0 / divisor;
  a.stream_grad = stream_gradient(grad);  // false for the empty grad of compute_grad=False
  run_rows(a, n_rows);

  return AT_DISPATCH_FLOATING_TYPES(launch.acc_type, "kd_loss_cpu", [&] {
    check_rows_defined<scalar_t>(rows, op, "student_logits or teacher_logits");
    return std::make_tuple(reduce_rows<scalar_t>(rows, how, divisor), grad);
  });
}

std::tuple<at::Tensor, at::Tensor> fused_kd_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& hyper, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  return loss_and_grad("fused_kd_loss", KDMode::kFused, student_logits, teacher_logits, labels, nullptr, std::nullopt,
                       hyper, ignore_index, reduction, num_items_in_batch, 0, student_logits.size(-1), compute_grad);
}

std::tuple<at::Tensor, at::Tensor> kd_slice_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& stats, const std::optional<at::Tensor>& jsd_sums, const at::Tensor& hyper, int64_t ignore_index,
    c10::string_view reduction, const std::optional<at::Tensor>& num_items_in_batch, int64_t class_offset,
    int64_t n_classes, bool compute_grad) {
  return loss_and_grad("kd_slice_loss", KDMode::kSlice, student_logits, teacher_logits, labels, &stats, jsd_sums,
                       hyper, ignore_index, reduction, num_items_in_batch, class_offset, n_classes, compute_grad);
}

at::Tensor kd_slice_stats_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const std::optional<at::Tensor>& labels, const at::Tensor& hyper,
                              int64_t ignore_index, int64_t class_offset, int64_t n_classes) {
  const KDParams p = make_kd_params(hyper, ignore_index, labels.has_value(), false);
  KDLaunch launch = prepare("kd_slice_stats", KDMode::kStats, student_logits, teacher_logits, labels, p,
                            class_offset, n_classes);
  auto out = at::empty({student_logits.size(0), kNumKDStats}, student_logits.options().dtype(launch.acc_type));
  launch.rows.out = out.data_ptr();
  run_rows(launch.rows, student_logits.size(0));
  return out;
}

at::Tensor kd_slice_jsd_sums_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                 const at::Tensor& hyper, int64_t ignore_index) {
  const KDParams p = make_kd_params(hyper, ignore_index, labels.has_value(), false);
  KDLaunch launch = prepare("kd_slice_jsd_sums", KDMode::kJSDSums, student_logits, teacher_logits, labels, p, 0, 0);
  check_merged_stats("kd_slice_jsd_sums", stats, student_logits, kNumKDStats);
  auto out = at::empty({student_logits.size(0), 2}, student_logits.options().dtype(launch.acc_type));
  launch.rows.stats = stats.const_data_ptr();
  launch.rows.out = out.data_ptr();
  run_rows(launch.rows, student_logits.size(0));
  return out;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) {
  m.impl("fused_kd_loss", &cpu::fused_kd_loss_cpu);
  m.impl("kd_slice_stats", &cpu::kd_slice_stats_cpu);
  m.impl("kd_slice_jsd_sums", &cpu::kd_slice_jsd_sums_cpu);
  m.impl("kd_slice_loss", &cpu::kd_slice_loss_cpu);
}

}  // namespace lepton_fast
