// CPU kernels of fgsm_perturb and pgd_step (and their in-place forms): one pass over contiguous buffers,
// chunks of the flat range in parallel (at::parallel_for), bfloat16 / float16 widened to
// float32 and rounded once at the store. A chunk is cut at sample boundaries when a
// per-sample eps or step size applies, so each run sees constant scalars.
//
// The inner loop is plain C++ that the compiler vectorises. at::vec is not used: this
// extension is compiled once, without torch's per-CPU-capability builds, so at::vec falls
// back to its generic Vectorized (arrays, masks through memory), which measured 4x slower
// than this loop on 224x224 images (and no faster than the eager composition).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../adversarial.h"

namespace lepton_fast {
namespace {

using adv::StepParams;

// ~256 KB of float32 per task: large enough to amortise the task, small enough to balance.
constexpr int64_t kGrain = 1 << 16;

// Calls run(begin, end, step, eps) on maximal runs of [0, numel) inside one sample, in parallel.
template <typename acc_t, typename Run>
void for_each_run(int64_t numel, const StepParams<acc_t>& p, const Run& run) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t sample = p.inner > 0 ? begin / p.inner : 0;
      const int64_t stop = std::min(end, (sample + 1) * p.inner);
      run(begin, stop, p.step_per_sample ? p.step_per_sample[sample] : p.step,
          p.eps_per_sample ? p.eps_per_sample[sample] : p.eps);
      begin = stop;
    }
  });
}

void fgsm_into(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
               const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max,
               const at::Tensor& out) {
  adv::check_buffers("fgsm_perturb", out, {&x, &grad});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fgsm_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = adv::make_params<acc_t>("fgsm_perturb", out, eps, nullptr, clamp_min, clamp_max);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_run(out.numel(), p, [&](int64_t begin, int64_t end, acc_t size, acc_t) {
      for (int64_t i = begin; i < end; ++i) {
        op[i] = static_cast<scalar_t>(adv::fgsm_value<acc_t>(xp[i], gp[i], size, p.clamp, p.lo, p.hi));
      }
    });
  });
}

void pgd_into(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, const at::Tensor& step_size,
              const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
              const std::optional<at::Tensor>& clamp_max, const at::Tensor& out) {
  adv::check_buffers("pgd_step", out, {&x_adv, &x_orig, &grad});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = adv::make_params<acc_t>("pgd_step", out, step_size, &eps, clamp_min, clamp_max);
    const scalar_t* ap = x_adv.const_data_ptr<scalar_t>();
    const scalar_t* xp = x_orig.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_run(out.numel(), p, [&](int64_t begin, int64_t end, acc_t step, acc_t radius) {
      for (int64_t i = begin; i < end; ++i) {
        op[i] = static_cast<scalar_t>(
            adv::pgd_value<acc_t>(ap[i], xp[i], gp[i], step, -radius, radius, p.clamp, p.lo, p.hi));
      }
    });
  });
}

at::Tensor fgsm_perturb_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                            const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  fgsm_into(x, grad, eps, clamp_min, clamp_max, out);
  return out;
}

void fgsm_perturb_cpu_(at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                       const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max) {
  fgsm_into(x, grad, eps, clamp_min, clamp_max, x);  // elementwise: the output may be the input
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                        const at::Tensor& step_size, const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
                        const std::optional<at::Tensor>& clamp_max) {
  auto out = at::empty_like(x_adv, at::MemoryFormat::Contiguous);
  pgd_into(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max, out);
  return out;
}

void pgd_step_cpu_(at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, const at::Tensor& step_size,
                   const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
                   const std::optional<at::Tensor>& clamp_max) {
  pgd_into(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max, x_adv);
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) {
  m.impl("fgsm_perturb", &fgsm_perturb_cpu);
  m.impl("fgsm_perturb_", &fgsm_perturb_cpu_);
  m.impl("pgd_step", &pgd_step_cpu);
  m.impl("pgd_step_", &pgd_step_cpu_);
}

}  // namespace lepton_fast
