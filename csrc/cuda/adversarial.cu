// CUDA kernels of fgsm_perturb and pgd_step (and their in-place forms): one elementwise pass on
// the current stream, 16-byte packs (common.cuh) when every buffer is aligned. Nothing here
// synchronises with the host: 0-d CPU operands are read on the host, every other operand on
// the device, and the faults of csrc/adversarial.h are device assertions.
//
// Operands (csrc/adversarial.h): value(i) = data[(i / run) % period]. A thread divides once
// per pack and per operand, then steps (i / run, i % run) along the pack; the division is
// ATen's multiply-and-shift IntDivider while indices fit in 31 bits, a plain 64-bit one beyond.
// All-constant operands, the common case, compile to a kernel without index arithmetic.
//
// Bit-exactness with torch: the extension is built with --use_fast_math, whose -ftz would
// flush float32 denormals in additions and comparisons (a denormal gradient would get
// sign 0, where torch.sign gives +-1). float32 math therefore goes through Ieee32, whose
// operators are explicit PTX instructions without .ftz (round to nearest); they are also
// never contracted into FMAs. double is unaffected by -ftz.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../adversarial.h"
#include "common.cuh"

namespace lepton_fast {
namespace {

using at::cuda::detail::IntDivider;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;

struct Ieee32 {
  float v;
  Ieee32() = default;
  __host__ __device__ __forceinline__ Ieee32(float f) : v(f) {}
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
__device__ __forceinline__ Ieee32 operator-(Ieee32 a) { return __int_as_float(__float_as_int(a.v) ^ 0x80000000); }
__device__ __forceinline__ bool operator<(Ieee32 a, Ieee32 b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a.v), "f"(b.v));
  return r != 0;
}
__device__ __forceinline__ bool operator<=(Ieee32 a, Ieee32 b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.le.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a.v), "f"(b.v));
  return r != 0;
}

// The policy of csrc/adversarial.h's math for one element.
struct DeviceOps {
  template <typename T>
  __device__ __forceinline__ static T where(bool mask, T a, T b) {
    return mask ? a : b;
  }
  __device__ __forceinline__ static bool any_of(bool a, bool b) { return a || b; }
  __device__ __forceinline__ static bool all_of(bool a, bool b) { return a && b; }
  __device__ __forceinline__ static Ieee32 abs(Ieee32 a) { return __int_as_float(__float_as_int(a.v) & 0x7fffffff); }
  __device__ __forceinline__ static double abs(double a) { return fabs(a); }
};

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

template <typename acc_t, typename index_t>
struct DeviceOperand {
  const acc_t* data;  // null: `value` everywhere
  acc_t value;
  IntDivider<index_t> run, period;
};

template <typename acc_t, typename index_t>
DeviceOperand<acc_t, index_t> on_device(const adv::Operand& o) {
  if (o.data == nullptr) return {nullptr, acc_t(o.value), IntDivider<index_t>(1), IntDivider<index_t>(1)};
  return {static_cast<const acc_t*>(o.data), acc_t(0), IntDivider<index_t>(static_cast<index_t>(o.run)),
          IntDivider<index_t>(static_cast<index_t>(o.period))};
}

template <typename acc_t, typename index_t>
struct DeviceArgs {
  DeviceOperand<acc_t, index_t> step, eps, lo, hi;
  bool clamp;
  acc_t limit;
};

// The kVec values of an operand from flat index `base` on.
template <int kVec, bool kTensors, typename acc_t, typename index_t>
__device__ __forceinline__ void operand_values(const DeviceOperand<acc_t, index_t>& o, index_t base, acc_t* v) {
  if (!kTensors || o.data == nullptr) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = o.value;
    return;
  }
  const auto qr = o.run.divmod(base);
  index_t q = o.period.mod(qr.div), r = qr.mod;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    v[k] = o.data[q];
    if (++r == o.run.divisor) {
      r = 0;
      if (++q == o.period.divisor) q = 0;
    }
  }
}

template <typename scalar_t, int kVec, typename index_t, bool kPgd, bool kTensors>
__global__ void step_kernel(const scalar_t* x,  // may be out itself (in place)
                            const scalar_t* __restrict__ orig, const scalar_t* __restrict__ grad, scalar_t* out,
                            index_t numel, bool aligned, DeviceArgs<at::opmath_type<scalar_t>, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Math<scalar_t>;
  using T = typename M::type;
  const T limit = p.limit, finite = std::numeric_limits<acc_t>::max();
  const index_t stride = index_t(gridDim.x) * blockDim.x * kVec;
  for (index_t base = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < numel; base += stride) {
    const int n = numel - base < index_t(kVec) ? int(numel - base) : kVec;
    Pack<scalar_t, kVec> xs, os, gs, res;
    if (aligned && n == kVec) {
      xs = load_pack<scalar_t, kVec>(x + base);
      gs = load_pack<scalar_t, kVec>(grad + base);
      if (kPgd) os = load_pack<scalar_t, kVec>(orig + base);
    } else {
      for (int k = 0; k < n; ++k) {
        xs.v[k] = x[base + k];
        gs.v[k] = grad[base + k];
        if (kPgd) os.v[k] = orig[base + k];
      }
    }
    acc_t step[kVec], eps[kVec], lo[kVec], hi[kVec];
    operand_values<kVec, kTensors>(p.step, base, step);
    if (kPgd) operand_values<kVec, kTensors>(p.eps, base, eps);
    if (p.clamp) {
      operand_values<kVec, kTensors>(p.lo, base, lo);
      operand_values<kVec, kTensors>(p.hi, base, hi);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k >= n) break;
      const T xv = M::load(xs.v[k]), gv = M::load(gs.v[k]);
      const T input = kPgd ? M::load(os.v[k]) : xv, radius = kPgd ? eps[k] : step[k];
      const T lov = p.clamp ? T(lo[k]) : T(0.0f), hiv = p.clamp ? T(hi[k]) : T(0.0f);
      const T r = kPgd ? adv::pgd_value<DeviceOps>(xv, input, gv, T(step[k]), radius, p.clamp, lov, hiv)
                       : adv::fgsm_value<DeviceOps>(xv, gv, T(step[k]), p.clamp, lov, hiv);
      res.v[k] = M::store(r);
      if (kPgd) {
        CUDA_KERNEL_ASSERT_MSG(!(p.clamp && adv::outside_box<DeviceOps>(input, radius, lov, hiv)),
                               "pgd_step: x_orig lies farther than eps outside the clamp box [clamp_min, clamp_max], "
                               "so the clamp would move the result more than eps from it. " LF_ADV_BOX_FIX);
        CUDA_KERNEL_ASSERT_MSG(!adv::overflows<DeviceOps>(r, xv, input, limit, finite),
                               "pgd_step: the step is not finite in x's dtype: step_size and eps are beyond its "
                               "range for this input. Use smaller values, a clamp within the range, or a wider dtype.");
      } else {
        CUDA_KERNEL_ASSERT_MSG(!(p.clamp && adv::outside_box<DeviceOps>(input, radius, lov, hiv)),
                               "fgsm_perturb: x lies farther than eps outside the clamp box [clamp_min, clamp_max], "
                               "so the clamp would move the result more than eps from it. " LF_ADV_BOX_FIX);
        CUDA_KERNEL_ASSERT_MSG(!adv::overflows<DeviceOps>(r, xv, input, limit, finite),
                               "fgsm_perturb: x + eps * sign(grad) is not finite in x's dtype: eps is beyond its "
                               "range for this x. Use a smaller eps, a clamp within the range, or a wider dtype.");
      }
    }
    if (aligned && n == kVec) {
      store_pack(out + base, res);
    } else {
      for (int k = 0; k < n; ++k) out[base + k] = res.v[k];
    }
  }
}

bool has_tensor(const adv::StepArgs& a, bool pgd) {
  return a.step.data || (pgd && a.eps.data) || (a.clamp && (a.lo.data || a.hi.data));
}

template <typename scalar_t, typename index_t>
void launch(const scalar_t* x, const scalar_t* orig, const scalar_t* grad, scalar_t* out, int64_t numel,
            const adv::StepArgs& a, bool pgd) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kThreads = 256;
  auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool aligned = aligned16(x) && aligned16(grad) && aligned16(out) && (!pgd || aligned16(orig));
  const DeviceArgs<acc_t, index_t> p{on_device<acc_t, index_t>(a.step), on_device<acc_t, index_t>(a.eps),
                                      on_device<acc_t, index_t>(a.lo), on_device<acc_t, index_t>(a.hi), a.clamp,
                                      acc_t(a.limit)};
  const int64_t per_block = int64_t(kThreads) * kVec;
  const int64_t blocks = std::min<int64_t>((numel + per_block - 1) / per_block, (int64_t(1) << 31) - 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  BOOL_SWITCH(pgd, kPgd, [&] {
    BOOL_SWITCH(has_tensor(a, pgd), kTensors, [&] {
      step_kernel<scalar_t, kVec, index_t, kPgd, kTensors>
          <<<blocks, kThreads, 0, stream>>>(x, orig, grad, out, static_cast<index_t>(numel), aligned, p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_step(const char* op, const at::Tensor& x, const at::Tensor* x_orig, const at::Tensor& grad,
              const at::Tensor& step, const at::Tensor* eps, const std::optional<at::Tensor>& clamp_min,
              const std::optional<at::Tensor>& clamp_max, const at::Tensor& out) {
  const bool pgd = x_orig != nullptr;
  const c10::cuda::CUDAGuard guard(out.device());
  // The operands a kernel reads: the index arithmetic runs per element, so no run is too short.
  std::vector<at::Tensor> keep_alive;
  const adv::StepArgs args =
      pgd ? adv::make_step_args(op, out, {&x, x_orig, &grad}, step, eps, clamp_min, clamp_max, 1, keep_alive)
          : adv::make_step_args(op, out, {&x, &grad}, step, nullptr, clamp_min, clamp_max, 1, keep_alive);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "adversarial_step_cuda", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* op_ = pgd ? x_orig->const_data_ptr<scalar_t>() : xp;
    const auto* gp = grad.const_data_ptr<scalar_t>();
    auto* outp = out.data_ptr<scalar_t>();
    if (numel <= std::numeric_limits<int32_t>::max()) {
      launch<scalar_t, uint32_t>(xp, op_, gp, outp, numel, args, pgd);
    } else {
      launch<scalar_t, uint64_t>(xp, op_, gp, outp, numel, args, pgd);
    }
  });
}

at::Tensor fgsm_perturb_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                             const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run_step("fgsm_perturb", x, nullptr, grad, eps, nullptr, clamp_min, clamp_max, out);
  return out;
}

void fgsm_perturb_cuda_(at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                        const std::optional<at::Tensor>& clamp_min, const std::optional<at::Tensor>& clamp_max) {
  run_step("fgsm_perturb_", x, nullptr, grad, eps, nullptr, clamp_min, clamp_max, x);
}

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                         const at::Tensor& step_size, const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
                         const std::optional<at::Tensor>& clamp_max) {
  auto out = at::empty_like(x_adv, at::MemoryFormat::Contiguous);
  run_step("pgd_step", x_adv, &x_orig, grad, step_size, &eps, clamp_min, clamp_max, out);
  return out;
}

void pgd_step_cuda_(at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad, const at::Tensor& step_size,
                    const at::Tensor& eps, const std::optional<at::Tensor>& clamp_min,
                    const std::optional<at::Tensor>& clamp_max) {
  run_step("pgd_step_", x_adv, &x_orig, grad, step_size, &eps, clamp_min, clamp_max, x_adv);
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("fgsm_perturb", &fgsm_perturb_cuda);
  m.impl("fgsm_perturb_", &fgsm_perturb_cuda_);
  m.impl("pgd_step", &pgd_step_cuda);
  m.impl("pgd_step_", &pgd_step_cuda_);
}

}  // namespace lepton_fast
