// CPU kernels of fgsm_perturb and pgd_step (and their in-place forms): tensor checks, the
// operands' description (csrc/adversarial.h), the flat range in parallel chunks, the choice of
// the step kernel's instruction set (adversarial_rows.h, compiled once per ISA in
// isa_<isa>.cpp, picked with ATen's own at::get_cpu_capability(): see isa.h), and the errors
// for the faults the kernel finds in the data.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "adversarial_cpu.h"
#include "isa.h"

namespace lepton_fast {
namespace cpu {
namespace {

// ~256 KB of float32 per task: large enough to amortise the task, small enough to balance.
constexpr int64_t kGrain = 1 << 16;
// An operand constant over runs (or contiguous over periods) shorter than this is expanded to
// x's shape first: segments of a few vectors would keep the loop in its tails.
constexpr int64_t kMinSegment = 64;

const char* dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default: return "float64";
  }
}

double largest_finite(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return 65504.0;
    case at::kBFloat16: return std::ldexp(255.0, 120);
    case at::kFloat: return std::numeric_limits<float>::max();
    default: return std::numeric_limits<double>::max();
  }
}

void keep_first(Fault& first, const Fault& f) {
  if (f.index >= 0 && (first.index < 0 || f.index < first.index)) first = f;
}

void run_step(const char* op, const at::Tensor& x, const at::Tensor* x_orig, const at::Tensor& grad,
              const at::Tensor& step, const at::Tensor* eps, const std::optional<at::Tensor>& clamp_min,
              const std::optional<at::Tensor>& clamp_max, const at::Tensor& out) {
  const bool pgd = x_orig != nullptr;
  std::vector<at::Tensor> keep_alive;
  const adv::StepArgs args =
      pgd ? adv::make_step_args(op, out, {&x, x_orig, &grad}, step, eps, clamp_min, clamp_max, kMinSegment, keep_alive)
          : adv::make_step_args(op, out, {&x, &grad}, step, nullptr, clamp_min, clamp_max, kMinSegment, keep_alive);
  const StepBuffers a{x.const_data_ptr(), pgd ? x_orig->const_data_ptr() : nullptr, grad.const_data_ptr(),
                      out.data_ptr(), out.scalar_type(), pgd, args};
  const auto fn = pick_isa(&adversarial_step_default, &adversarial_step_avx2, &adversarial_step_avx512);
  std::mutex mutex;
  StepFaults first;
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    const StepFaults f = fn(a, begin, end);
    if (f.outside_box.index >= 0 || f.overflow.index >= 0) {
      const std::lock_guard<std::mutex> lock(mutex);
      keep_first(first.outside_box, f.outside_box);
      keep_first(first.overflow, f.overflow);
    }
  });

  const auto opmath = at::toOpMathType(out.scalar_type());
  const char* input = pgd ? "x_orig" : "x";
  if (first.outside_box.index >= 0) {
    const int64_t i = first.outside_box.index;
    TORCH_CHECK_VALUE(false, op, ": ", input, " = ", first.outside_box.input, " (at flat index ", i,
                      ") lies farther than eps = ", adv::operand_at(pgd ? args.eps : args.step, opmath, i),
                      " outside the clamp box [", adv::operand_at(args.lo, opmath, i), ", ",
                      adv::operand_at(args.hi, opmath, i), "], so the clamp would move the result more than eps from ",
                      input, ". " LF_ADV_BOX_FIX);
  }
  if (first.overflow.index >= 0) {
    const int64_t i = first.overflow.index;
    const char* dtype = dtype_name(out.scalar_type());
    const std::string sizes = pgd ? c10::str("step_size = ", adv::operand_at(args.step, opmath, i),
                                             ", eps = ", adv::operand_at(args.eps, opmath, i))
                                  : c10::str("eps = ", adv::operand_at(args.step, opmath, i));
    TORCH_CHECK_VALUE(false, op, ": the step is not finite in ", dtype, " at flat index ", i, " (", input, " = ",
                      first.overflow.input, ", ", sizes, "): ", pgd ? "step_size and eps are" : "eps is",
                      " beyond the range of ", dtype, " for this input (largest finite value ",
                      largest_finite(out.scalar_type()), "). Use a smaller value, a clamp within the range, or a "
                      "wider dtype.");
  }
}

at::Tensor fgsm_perturb_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                            const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run_step("fgsm_perturb", x, nullptr, grad, eps, nullptr, clamp_min, clamp_max, out);
  return out;
}

void fgsm_perturb_cpu_(at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                       const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max) {
  run_step("fgsm_perturb_", x, nullptr, grad, eps, nullptr, clamp_min, clamp_max, x);  // elementwise: in place
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                        const at::Tensor& step_size, const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
                        const std::optional<at::Tensor>& clamp_max) {
  auto out = at::empty_like(x_adv, at::MemoryFormat::Contiguous);
  run_step("pgd_step", x_adv, &x_orig, grad, step_size, &eps, clamp_min, clamp_max, out);
  return out;
}

void pgd_step_cpu_(at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, const at::Tensor& step_size,
                   const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
                   const std::optional<at::Tensor>& clamp_max) {
  run_step("pgd_step_", x_adv, &x_orig, grad, step_size, &eps, clamp_min, clamp_max, x_adv);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) {
  m.impl("fgsm_perturb", &cpu::fgsm_perturb_cpu);
  m.impl("fgsm_perturb_", &cpu::fgsm_perturb_cpu_);
  m.impl("pgd_step", &cpu::pgd_step_cpu);
  m.impl("pgd_step_", &cpu::pgd_step_cpu_);
}

}  // namespace lepton_fast
