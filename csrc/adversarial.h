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

#include <cstdint>

#ifndef LF_HOST_DEVICE
#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LF_HOST_DEVICE inline
#endif
#endif

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

}  // namespace adv
}  // namespace lepton_fast
