// Adversarial perturbation steps: the per-element math shared by the CPU kernel (on
// float / double) and the CUDA kernel (on an IEEE float32 wrapper / double).
//   sign(g)  = [g > 0] - [g < 0]             (0 for 0 and NaN, as torch.sign)
//   clamp(v) = min(max(v, lo), hi)           keeping v when it equals a bound, NaN propagated
//   fgsm     = clamp01(x + eps * sign(g))
//   pgd      = clamp01(x_orig + clamp(x_adv + step * sign(g) - x_orig, -eps, eps))
// The operations and their order are those of the eager torch composition (torchattacks'
// PGD), so that float32 results are bit-identical to it. step * sign(g) is exact (0 or
// +-step), so contracting it with the addition into an FMA cannot change a bit; the other
// operations are separate roundings that no compiler contracts.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "common.h"


namespace lepton_fast {
namespace adv {

// The scalar arguments of both steps; a per-sample pointer (length N, acc_t) overrides the
// scalar beside it for the run of `inner` consecutive elements of each sample.
template <typename acc_t>
struct StepParams {
  acc_t step;  // fgsm: eps
  acc_t eps;   // pgd only
  const acc_t* step_per_sample;
  const acc_t* eps_per_sample;
  bool clamp;
  acc_t lo, hi;
  int64_t inner;
};

template <typename T>
LF_HOST_DEVICE T sign_of(T g) {
  return T(g > T(0.0f)) - T(g < T(0.0f));
}

template <typename T>
LF_HOST_DEVICE T clamp_keep(T v, T lo, T hi) {
  v = v < lo ? lo : v;  // NaN compares false: kept
  return hi < v ? hi : v;
}


template <typename V>
LF_HOST_DEVICE V fgsm_value(V x, V g, V eps, bool clamp, V lo, V hi) {
  const V out = x + eps * sign_of(g);
  return clamp ? clamp_keep(out, lo, hi) : out;
}

template <typename V>
LF_HOST_DEVICE V pgd_value(V x_adv, V x_orig, V g, V step, V neg_eps, V eps, bool clamp, V lo, V hi) {
  const V stepped = x_adv + step * sign_of(g);
  const V out = x_orig + clamp_keep(stepped - x_orig, neg_eps, eps);
  return clamp ? clamp_keep(out, lo, hi) : out;
}

// Host side, shared by the CPU and CUDA kernels: the checks of the buffers, and the scalars as
// the kernels read them. A per-sample tensor must be [N] in the opmath dtype.
inline void check_buffers(const char* op, const at::Tensor& out, std::initializer_list<const at::Tensor*> inputs) {
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), op, ": expected a floating dtype, got ", out.scalar_type());
  for (const at::Tensor* t : inputs) {
    TORCH_CHECK(t->device() == out.device() && t->sizes() == out.sizes() && t->scalar_type() == out.scalar_type() &&
                    t->is_contiguous(),
                op, ": every input must be contiguous, on out's device, with out's shape and dtype");
  }
}

template <typename acc_t>
StepParams<acc_t> make_params(const char* op, const at::Tensor& out, double step,
                              const std::optional<at::Tensor>& step_ps, double eps,
                              const std::optional<at::Tensor>& eps_ps, std::optional<double> lo,
                              std::optional<double> hi) {
  TORCH_CHECK(lo.has_value() == hi.has_value(), op, ": clamp_min and clamp_max must both be given or both be None");
  StepParams<acc_t> p{acc_t(step), acc_t(eps), nullptr, nullptr, lo.has_value(),
                      acc_t(lo.value_or(0)), acc_t(hi.value_or(0)), out.numel()};
  const int64_t n = out.dim() > 0 ? out.size(0) : 1;
  for (auto [t, ptr] : {std::pair{&step_ps, &p.step_per_sample}, std::pair{&eps_ps, &p.eps_per_sample}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = t->value();
    TORCH_CHECK(out.dim() > 0 && v.dim() == 1 && v.size(0) == n && v.is_contiguous() &&
                    v.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && v.device() == out.device(),
                op, ": a per-sample tensor must be a contiguous [N] tensor of the opmath dtype on out's device");
    *ptr = v.const_data_ptr<acc_t>();
    p.inner = n > 0 ? out.numel() / n : 1;
  }
  return p;
}

}  // namespace adv
}  // namespace lepton_fast
