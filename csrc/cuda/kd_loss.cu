// CUDA kernels of fused_kd_loss and scale_grad_ (schemas in csrc/ops.cpp).
//
// One thread block per row; the block walks the row with 16-byte vector loads when every
// row is 16-byte aligned. Pass 1 keeps online softmax statistics of student and teacher
// (and, for forward/reverse KL, E_p[z_p - z_q], which gives the divergence in the same
// pass: KL(p || q) = E_p[z_p - z_q] - lse_p + lse_q); a block reduction in a fixed tree
// merges them, so results are deterministic. JSD takes one more pass for its row constants.
// The last pass writes the gradient times grad_scale, which is read on the device: nothing
// here synchronises with the host. Indexing is 64-bit. The per-element math is
// csrc/kd_loss.h, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kd_loss.h"
#include "common.cuh"

namespace lepton_fast {

// The warp exchange block_reduce needs, beside the statistic's type (found by ADL).
template <typename acc_t>
__device__ __forceinline__ WeightedSoftmaxStats<acc_t> shfl_xor(const WeightedSoftmaxStats<acc_t>& a, int lane_mask) {
  WeightedSoftmaxStats<acc_t> o;
  o.max = __shfl_xor_sync(0xffffffffu, a.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, a.sum, lane_mask);
  o.weighted = __shfl_xor_sync(0xffffffffu, a.weighted, lane_mask);
  return o;
}

namespace {

using cuda::block_reduce;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::Sum;

// Calls f(i) for this thread's columns i = first, first + step, ... below n, in reverse order
// when `reverse`. The passes over a row alternate direction, so that each re-read starts on
// the columns the previous pass loaded last, the likeliest to be still in L2.
template <typename F>
__device__ __forceinline__ void sweep(int64_t n, int64_t first, int64_t step, bool reverse, F&& f) {
  if (!reverse) {
    for (int64_t i = first; i < n; i += step) f(i);
  } else {
    for (int64_t base = (n - 1) / step * step; base >= 0; base -= step) {
      if (base + first < n) f(base + first);
    }
  }
}

template <typename scalar_t, int kVec, int kThreads>
__global__ void __launch_bounds__(kThreads)
    kd_loss_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                   const int64_t* __restrict__ labels, scalar_t* __restrict__ grad,
                   at::opmath_type<scalar_t>* __restrict__ loss, const float* __restrict__ grad_scale,
                   int64_t n_classes, int64_t s_stride, int64_t t_stride, KDParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;

  const int64_t row = blockIdx.x;
  const scalar_t* s = student + row * s_stride;
  const scalar_t* t = teacher + row * t_stride;
  scalar_t* g = grad + row * n_classes;
  const int64_t first = int64_t(threadIdx.x) * kVec, step = int64_t(kThreads) * kVec;
  const int64_t label = p.has_labels ? labels[row] : -1;
  // The labels' range, checked where they are read (as ATen's nll_loss does on the GPU).
  CUDA_KERNEL_ASSERT(!p.has_labels || label == p.ignore_index || (label >= 0 && label < n_classes));

  if (p.has_labels && label == p.ignore_index) {
    if (threadIdx.x == 0) loss[row] = 0;
    if (p.compute_grad) {
      P zero;
#pragma unroll
      for (int k = 0; k < kVec; ++k) zero.v[k] = scalar_t(0);
      for (int64_t i = first; i < n_classes; i += step) store_pack(g + i, zero);
    }
    return;
  }

  const acc_t inv_t = p.inv_temperature, beta = p.beta;
  const acc_t log_beta = std::log(beta), log_1m_beta = std::log1p(-beta);
  const bool fwd = p.divergence == Divergence::kForwardKL, rev = p.divergence == Divergence::kReverseKL;

  // Pass 1: softmax statistics at T (student, teacher), at T = 1 (CE), and E_p[z_p - z_q].
  WeightedSoftmaxStats<acc_t> st_s, st_t, st_1;
  acc_t sum_x = 0;
  for (int64_t i = first; i < n_classes; i += step) {
    const P xs = load_pack<scalar_t, kVec>(s + i);
    P xt;
    if (p.needs_soft) xt = load_pack<scalar_t, kVec>(t + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t x = acc_t(xs.v[k]);
      if (p.needs_soft) {
        const acc_t zs = x * inv_t, zt = acc_t(xt.v[k]) * inv_t;
        st_s.add(zs, rev ? zs - zt : acc_t(0));
        st_t.add(zt, fwd ? zt - zs : acc_t(0));
      }
      if (p.needs_ce) {
        st_1.add(x);
        sum_x += x;
      }
    }
  }
  acc_t lse_s = 0, lse_t = 0, lse_1 = 0, row_loss = 0, k_s = 0;
  if (p.needs_soft) {
    st_s = block_reduce(st_s);
    st_t = block_reduce(st_t);
    lse_s = st_s.lse();
    lse_t = st_t.lse();
    acc_t div;
    if (fwd) {
      div = st_t.mean() - lse_t + lse_s;
    } else if (rev) {
      div = st_s.mean() - lse_s + lse_t;
      k_s = div;
    } else {
      // Pass 2 (JSD): D and K_s = KL(p_s || m) need log m, hence both row constants.
      acc_t d_part = 0, k_part = 0;
      sweep(n_classes, first, step, /*reverse=*/true, [&](int64_t i) {
        const P xs = load_pack<scalar_t, kVec>(s + i), xt = load_pack<scalar_t, kVec>(t + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc_t lps = acc_t(xs.v[k]) * inv_t - lse_s, lpt = acc_t(xt.v[k]) * inv_t - lse_t;
          const acc_t lm = log_mixture_of<ScalarMath<acc_t>>(lps, lpt, log_beta, log_1m_beta);
          const acc_t ks = kl_term(lps, lm);
          k_part += ks;
          d_part += beta * kl_term(lpt, lm) + (1 - beta) * ks;
        }
      });
      div = block_reduce(Sum<acc_t>{d_part}).value;
      k_s = block_reduce(Sum<acc_t>{k_part}).value;
    }
    row_loss = acc_t(p.soft_weight) * div;
  }
  const acc_t eps = p.label_smoothing, smooth = eps / acc_t(n_classes);
  if (p.needs_ce) {
    st_1 = block_reduce(st_1);
    lse_1 = st_1.lse();
    acc_t ce = lse_1 - (1 - eps) * acc_t(s[label]);
    // Only with smoothing: a masked (-inf) logit makes the sum -inf, and 0 * -inf is NaN.
    if (eps > 0) ce -= smooth * block_reduce(Sum<acc_t>{sum_x}).value;
    row_loss += acc_t(p.alpha) * ce;
  }
  if (threadIdx.x == 0) loss[row] = row_loss;
  if (!p.compute_grad) return;

  // Last pass: d(row loss)/d(student) * grad_scale.
  const acc_t gs = *grad_scale, soft_w = acc_t(p.soft_grad_weight) * gs, ce_w = acc_t(p.alpha) * gs;
  const bool jsd = p.needs_soft && p.divergence == Divergence::kJSD;  // its pass 2 went backwards
  sweep(n_classes, first, step, /*reverse=*/!jsd, [&](int64_t i) {
    const P xs = load_pack<scalar_t, kVec>(s + i);
    P xt, out;
    if (p.needs_soft) xt = load_pack<scalar_t, kVec>(t + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t x = acc_t(xs.v[k]);
      acc_t d = 0;
      if (p.needs_soft) {
        d = soft_w * soft_grad(p.divergence, x * inv_t - lse_s, acc_t(xt.v[k]) * inv_t - lse_t, k_s, beta, log_beta,
                               log_1m_beta);
      }
      if (p.needs_ce) d += ce_w * (std::exp(x - lse_1) - smooth - (i + k == label ? 1 - eps : acc_t(0)));
      out.v[k] = static_cast<scalar_t>(d);
    }
    store_pack(g + i, out);
  });
}

template <typename scalar_t, int kVec, int kThreads>
void launch_kd(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& grad,
               at::Tensor& rows, const at::Tensor& grad_scale, const KDParams& p) {
  const int64_t n_rows = student.size(0);
  kd_loss_kernel<scalar_t, kVec, kThreads><<<n_rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), labels,
      p.compute_grad ? grad.data_ptr<scalar_t>() : nullptr, rows.data_ptr<at::opmath_type<scalar_t>>(),
      grad_scale.const_data_ptr<float>(), student.size(1), student.stride(0), teacher.stride(0), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fused_kd_loss_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& temperature, const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& label_smoothing,
    c10::string_view divergence, int64_t ignore_index, bool scale_by_t2, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  check_kd_inputs(student_logits, teacher_logits, labels);
  const KDParams p = make_kd_params(temperature, beta, alpha, label_smoothing, divergence, ignore_index, scale_by_t2,
                                    labels.has_value(), compute_grad);
  const Reduction how = parse_reduction(reduction);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t n_rows = student_logits.size(0), n_classes = student_logits.size(1);
  TORCH_CHECK(n_rows <= int64_t(std::numeric_limits<int32_t>::max()), "fused_kd_loss: at most 2^31 - 1 rows");
  const auto device = student_logits.device();
  at::Tensor labels64;
  if (labels) {
    labels64 = labels->contiguous();
    LF_CHECK_DTYPE(labels64, at::kLong);
  }
  // What a "mean" divides by: the rows not ignored (counted on the device, at least 1), or
  // num_items_in_batch. Its reciprocal scales the gradient, read by the kernel on the device.
  at::Tensor divisor;
  if (num_items_in_batch) {
    divisor = num_items_in_batch->to(device, at::kFloat);
  } else if (how == Reduction::kMean) {
    divisor = labels ? (labels64 != ignore_index).sum().clamp_min(1).to(at::kFloat)
                     : at::scalar_tensor(static_cast<double>(std::max<int64_t>(n_rows, 1)),
                                         student_logits.options().dtype(at::kFloat));
  }
  const at::Tensor grad_scale =
      divisor.defined() && how != Reduction::kNone ? divisor.reciprocal()
                                                   : at::ones({}, student_logits.options().dtype(at::kFloat));
  const auto acc_type = at::toOpMathType(student_logits.scalar_type());
  auto rows = at::empty({n_rows}, student_logits.options().dtype(acc_type));
  auto grad = compute_grad ? at::empty_like(student_logits, at::MemoryFormat::Contiguous)
                           : at::empty({0}, student_logits.options());
  if (n_rows > 0 && n_classes > 0) {
    const int64_t* y = labels ? labels64.const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "fused_kd_loss_cuda", [&] {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = cuda::rows_aligned16<scalar_t>(student_logits.const_data_ptr(), student_logits.stride(0)) &&
                       cuda::rows_aligned16<scalar_t>(teacher_logits.const_data_ptr(), teacher_logits.stride(0)) &&
                       n_classes % kVec == 0;
      // Wide rows get more threads per row; narrow rows fewer, so more rows share an SM.
      const bool wide = n_classes >= 8192;
      if (vec && wide) {
        launch_kd<scalar_t, kVec, 1024>(student_logits, teacher_logits, y, grad, rows, grad_scale, p);
      } else if (vec) {
        launch_kd<scalar_t, kVec, 128>(student_logits, teacher_logits, y, grad, rows, grad_scale, p);
      } else if (wide) {
        launch_kd<scalar_t, 1, 1024>(student_logits, teacher_logits, y, grad, rows, grad_scale, p);
      } else {
        launch_kd<scalar_t, 1, 128>(student_logits, teacher_logits, y, grad, rows, grad_scale, p);
      }
    });
  }
  // A row whose softmax is undefined came out NaN: an error at the next synchronisation.
  at::_assert_async(at::logical_not(at::isnan(rows).any()),
                    "fused_kd_loss: a row of student_logits or teacher_logits is entirely -inf, or holds +inf or NaN, "
                    "so its softmax is undefined");
  if (how == Reduction::kNone) return {rows, grad};
  at::Tensor total = rows.sum();
  return {divisor.defined() ? total / divisor.to(acc_type) : total, grad};
}

// grad *= scale. A 0-d scale equal to 1 is tested by every block on the device, which then
// exits: the usual grad_output of 1 costs a launch, not a pass, and no host synchronisation.
template <typename scalar_t, int kVec, bool kPerRow>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ scale,
                                  int64_t numel, int64_t n_classes) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  acc_t factor = 0;
  if (!kPerRow) {
    factor = *scale;
    if (factor == acc_t(1)) return;
  }
  const int64_t step = int64_t(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < numel; i += step) {
    // n_classes % kVec == 0 when kVec > 1, so a pack never straddles two rows.
    if (kPerRow) factor = scale[i / n_classes];
    P x = load_pack<scalar_t, kVec>(grad + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) x.v[k] = static_cast<scalar_t>(acc_t(x.v[k]) * factor);
    store_pack(grad + i, x);
  }
}

template <typename scalar_t, int kVec, bool kPerRow>
void launch_scale(at::Tensor& grad, const at::Tensor& scale, int64_t n_classes) {
  constexpr int kThreads = 256;
  const int64_t numel = grad.numel();
  const int64_t blocks_needed = (numel / kVec + kThreads - 1) / kThreads;
  // Grid-stride beyond 2^16 blocks (256 MB per sweep in 16-byte packs): plenty to saturate
  // memory, and few enough that a skipped launch (scale == 1) ends in microseconds.
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks_needed, int64_t(1) << 16)));
  scale_grad_kernel<scalar_t, kVec, kPerRow><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad.data_ptr<scalar_t>(), scale.data_ptr<at::opmath_type<scalar_t>>(), numel, n_classes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_contiguous(), "scale_grad_: grad must be contiguous");
  const bool per_row = scale.dim() != 0;
  TORCH_CHECK(!per_row || (grad.dim() == 2 && scale.numel() == grad.size(0)),
              "scale_grad_: scale must be 0-d or [N] for an [N, C] grad");
  TORCH_CHECK(scale.device() == grad.device(), "scale_grad_: scale must be on grad's device");
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n_classes = grad.dim() == 2 ? grad.size(1) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cuda", [&] {
    // A dtype conversion on the device (a no-op for float32), never a host read.
    const at::Tensor factor = scale.to(at::toOpMathType(grad.scalar_type())).contiguous();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0 && grad.numel() % kVec == 0 &&
                     (!per_row || n_classes % kVec == 0);
    BOOL_SWITCH(per_row, kPerRow, [&] {
      vec ? launch_scale<scalar_t, kVec, kPerRow>(grad, factor, n_classes)
          : launch_scale<scalar_t, 1, kPerRow>(grad, factor, n_classes);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("fused_kd_loss", &fused_kd_loss_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace lepton_fast
