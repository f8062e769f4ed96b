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

// A step size or radius: a single value (numel 1, read on the host when it is a CPU tensor),
// or one value per sample (numel N, the opmath dtype, on out's device).
template <typename acc_t>
void read_size(const char* op, const char* name, const at::Tensor& out, const at::Tensor& v, acc_t* value,
               const acc_t** per_sample, int64_t* inner) {
  const int64_t n = out.dim() > 0 ? out.size(0) : 1;
  if (v.numel() == 1 && v.device().is_cpu()) {
    *value = acc_t(v.item<double>());
    return;
  }
  TORCH_CHECK(out.dim() > 0 && v.numel() == n && v.is_contiguous() &&
                  v.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && v.device() == out.device(),
              op, ": ", name, " must be one value or a contiguous per-sample tensor of the opmath dtype on out's device");
  *per_sample = v.const_data_ptr<acc_t>();
  *inner = n > 0 ? out.numel() / n : 1;
}

template <typename acc_t>
StepParams<acc_t> make_params(const char* op, const at::Tensor& out, const at::Tensor& step, const at::Tensor* eps,
                              const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& hi) {
  TORCH_CHECK(lo.has_value() == hi.has_value(), op, ": clamp_min and clamp_max must both be given or both be None");
  StepParams<acc_t> p{acc_t(0), acc_t(0), nullptr, nullptr, lo.has_value(), acc_t(0), acc_t(0), out.numel()};
  read_size(op, "step", out, step, &p.step, &p.step_per_sample, &p.inner);
  if (eps != nullptr) read_size(op, "eps", out, *eps, &p.eps, &p.eps_per_sample, &p.inner);
  if (lo) {
    TORCH_CHECK(lo->numel() == 1 && hi->numel() == 1 && lo->device().is_cpu() && hi->device().is_cpu(), op,
                ": clamp bounds must be single CPU values");
    p.lo = acc_t(lo->item<double>());
    p.hi = acc_t(hi->item<double>());
  }
  return p;
}

}  // namespace adv
}  // namespace lepton_fast
