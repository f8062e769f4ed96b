// CUDA kernels of fgsm_perturb_out and pgd_step_out: one elementwise pass on the current
// stream, 16-byte vector loads/stores when every buffer is aligned, int64 indexing.
//
// Bit-exactness with torch: the extension is built with --use_fast_math, whose -ftz would
// flush float32 denormals in additions and comparisons (a denormal gradient would get
// sign 0, where torch.sign gives +-1). float32 math therefore goes through Ieee32, whose
// operators are explicit PTX instructions without .ftz (round to nearest); they are also
// never contracted into FMAs. double is unaffected by -ftz.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../adversarial.h"

namespace lepton_fast {
namespace {

using adv::StepParams;

struct Ieee32 {
  float v;
  Ieee32() = default;
  __device__ __forceinline__ Ieee32(float f) : v(f) {}
  __device__ __forceinline__ explicit Ieee32(bool b) : v(b ? 1.0f : 0.0f) {}
};

__device__ __forceinline__ Ieee32 operator+(Ieee32 a, Ieee32 b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a.v), "f"(b.v));
  return r;
}
__device__ __forceinline__ Ieee32 operator-(Ieee32 a, Ieee32 b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a.v), "f"(b.v));
  return r;
}
__device__ __forceinline__ Ieee32 operator*(Ieee32 a, Ieee32 b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a.v), "f"(b.v));
  return r;
}
__device__ __forceinline__ Ieee32 operator-(Ieee32 a) {
  float r;
  asm("neg.f32 %0, %1;" : "=f"(r) : "f"(a.v));
  return r;
}
__device__ __forceinline__ bool operator<(Ieee32 a, Ieee32 b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a.v), "f"(b.v));
  return r != 0;
}
__device__ __forceinline__ bool operator>(Ieee32 a, Ieee32 b) { return b < a; }

// The type the per-element math runs in: Ieee32 for float / half / bfloat16, else double.
template <typename scalar_t>
struct Math {
  using type = Ieee32;
  __device__ __forceinline__ static Ieee32 load(scalar_t v) { return static_cast<float>(v); }
  __device__ __forceinline__ static scalar_t store(Ieee32 v) { return static_cast<scalar_t>(v.v); }
};
template <>
struct Math<double> {
  using type = double;
  __device__ __forceinline__ static double load(double v) { return v; }
  __device__ __forceinline__ static double store(double v) { return v; }
};

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <typename scalar_t, int VEC, bool PGD>
__global__ void step_kernel(const scalar_t* x,  // may be out itself (in place)
                            const scalar_t* __restrict__ orig,
                            const scalar_t* __restrict__ grad, scalar_t* out, int64_t numel,
                            StepParams<at::opmath_type<scalar_t>> p) {
  using M = Math<scalar_t>;
  using T = typename M::type;
  const T lo = p.lo, hi = p.hi;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * VEC;
  for (int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; base < numel; base += stride) {
    const int n = numel - base < VEC ? int(numel - base) : VEC;
    Pack<scalar_t, VEC> xs, os, gs, res;
    if (n == VEC) {
      xs = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + base);
      gs = *reinterpret_cast<const Pack<scalar_t, VEC>*>(grad + base);
      if (PGD) os = *reinterpret_cast<const Pack<scalar_t, VEC>*>(orig + base);
    } else {
      for (int k = 0; k < n; ++k) {
        xs.v[k] = x[base + k];
        gs.v[k] = grad[base + k];
        if (PGD) os.v[k] = orig[base + k];
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t sample = (p.step_per_sample || p.eps_per_sample) ? (base + k) / p.inner : 0;
      const T step = p.step_per_sample ? p.step_per_sample[k < n ? sample : 0] : p.step;
      T out_k;
      if (PGD) {
        const T radius = p.eps_per_sample ? p.eps_per_sample[k < n ? sample : 0] : p.eps;
        out_k = adv::pgd_value(M::load(xs.v[k]), M::load(os.v[k]), M::load(gs.v[k]), step, -radius, radius, p.clamp,
                               lo, hi);
      } else {
        out_k = adv::fgsm_value(M::load(xs.v[k]), M::load(gs.v[k]), step, p.clamp, lo, hi);
      }
      res.v[k] = M::store(out_k);
    }
    if (n == VEC) {
      *reinterpret_cast<Pack<scalar_t, VEC>*>(out + base) = res;
    } else {
      for (int k = 0; k < n; ++k) out[base + k] = res.v[k];
    }
  }
}

template <bool PGD, typename scalar_t>
void launch(const scalar_t* x, const scalar_t* orig, const scalar_t* grad, scalar_t* out, int64_t numel,
            const StepParams<at::opmath_type<scalar_t>>& p) {
  if (numel == 0) return;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kThreads = 256;
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vec = aligned(x) && aligned(grad) && aligned(out) && (!PGD || aligned(orig));
  const int64_t per_block = int64_t(kThreads) * (vec ? kVec : 1);
  const int64_t blocks = std::min<int64_t>((numel + per_block - 1) / per_block, (int64_t(1) << 31) - 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    step_kernel<scalar_t, kVec, PGD><<<blocks, kThreads, 0, stream>>>(x, orig, grad, out, numel, p);
  } else {
    step_kernel<scalar_t, 1, PGD><<<blocks, kThreads, 0, stream>>>(x, orig, grad, out, numel, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fgsm_perturb_out_cuda(const at::Tensor& x, const at::Tensor& grad, double eps,
                           const std::optional<at::Tensor>& eps_per_sample, std::optional<double> clamp_min,
                           std::optional<double> clamp_max, const at::Tensor& out) {
  adv::check_buffers("fgsm_perturb_out", out, {&x, &grad});
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fgsm_perturb_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = adv::make_params<acc_t>("fgsm_perturb_out", out, eps, eps_per_sample, 0.0, std::nullopt, clamp_min,
                                      clamp_max);
    launch<false>(x.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                  out.mutable_data_ptr<scalar_t>(), out.numel(), p);
  });
}

void pgd_step_out_cuda(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, double step_size,
                       const std::optional<at::Tensor>& step_per_sample, double eps,
                       const std::optional<at::Tensor>& eps_per_sample, std::optional<double> clamp_min,
                       std::optional<double> clamp_max, const at::Tensor& out) {
  adv::check_buffers("pgd_step_out", out, {&x_adv, &x_orig, &grad});
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "pgd_step_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = adv::make_params<acc_t>("pgd_step_out", out, step_size, step_per_sample, eps, eps_per_sample,
                                      clamp_min, clamp_max);
    launch<true>(x_adv.const_data_ptr<scalar_t>(), x_orig.const_data_ptr<scalar_t>(),
                 grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), out.numel(), p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("fgsm_perturb_out", &fgsm_perturb_out_cuda);
  m.impl("pgd_step_out", &pgd_step_out_cuda);
}

}  // namespace lepton_fast
