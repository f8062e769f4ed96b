// CPU kd_loss_forward: argument checks, outputs, rows in parallel, and the choice of the row
// kernel's instruction set (kd_loss_rows.h, compiled once per ISA in kd_loss_rows_<isa>.cpp).
//
// The ISA follows ATen's own choice, at::get_cpu_capability(): AVX512 or AVX2 where the CPU
// has it and ATEN_CPU_CAPABILITY does not lower it, else the portable build. So a wheel built
// on any x86-64 machine runs on every x86-64 CPU, uses the vector width torch uses, and
// ATEN_CPU_CAPABILITY=default|avx2 selects the other paths for testing.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kd_loss_cpu.h"

namespace lepton_fast {
namespace cpu {
namespace {

using KDRowsFn = void (*)(const KDRows&, int64_t, int64_t);

KDRowsFn row_kernel() {
  static const KDRowsFn fn = [] {
    const std::string isa = at::get_cpu_capability();
    if (isa == "AVX512") return &kd_rows_avx512;
    if (isa == "AVX2") return &kd_rows_avx2;
    return &kd_rows_default;
  }();
  return fn;
}

// The gradient is as large as the logits and a fresh allocation on every call, so its first
// touch faults in every page: 64k faults for 256 MiB, measured at ~350 of the ~460 ms that a
// first write of 256 MiB took on the 2-core benchmark VM. Transparent huge pages (Linux,
// when THP is in "madvise" mode) cut that to one fault per 2 MiB (~190 ms for the same
// write). Advisory only: where it fails or THP is off, nothing changes. PyTorch's allocator
// does the same for every tensor under THP_MEM_ALLOC_ENABLE=1.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, double temperature, c10::string_view divergence, double beta,
    double alpha, double label_smoothing, int64_t ignore_index, bool scale_by_t2, bool compute_grad) {
  check_kd_inputs(student, teacher, labels, grad_scale);
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "kd_loss_forward: logits must be float32, float64, bfloat16 or float16, got ", dtype);
  const KDParams p = make_kd_params(temperature, divergence, beta, alpha, label_smoothing, ignore_index,
                                    scale_by_t2, labels.has_value(), compute_grad);
  const int64_t n_rows = student.size(0), n_classes = student.size(1);
  at::Tensor labels64;
  if (labels) {
    labels64 = labels->to(at::kLong).contiguous();
    const bool in_range = ((labels64 >= 0) & (labels64 < n_classes) | (labels64 == ignore_index)).all().item<bool>();
    TORCH_CHECK(in_range, "kd_loss_forward: labels must be in [0, ", n_classes, ") or equal ignore_index");
  }
  // float32 losses, float64 for float64 logits (gradcheck).
  auto loss = at::empty({n_rows}, student.options().dtype(at::toOpMathType(dtype)));
  auto grad = compute_grad ? at::empty({n_rows, n_classes}, student.options()) : at::empty({0}, student.options());
  if (compute_grad) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  KDRows a{student.data_ptr(), teacher.data_ptr(), labels ? labels64.data_ptr<int64_t>() : nullptr,
           compute_grad ? grad.data_ptr() : nullptr, loss.data_ptr(), n_classes, student.stride(0),
           teacher.stride(0), dtype, p, grad_scale.item<float>()};
  // Rows are independent; a task of at least ~64k elements keeps scheduling cost negligible.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n_classes, 1));
  const KDRowsFn fn = row_kernel();
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  return {loss, grad};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("kd_loss_forward", &cpu::kd_loss_forward_cpu); }

}  // namespace lepton_fast
