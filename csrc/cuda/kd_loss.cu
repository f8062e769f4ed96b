// CUDA kernels of kd_loss_forward and scale_grad_ (schemas in csrc/ops.cpp).
//
// One thread block per row; the block walks the row with 16-byte vector loads when every
// row is 16-byte aligned. Pass 1 keeps online softmax statistics of student and teacher
// (and, for forward/reverse KL, E_p[z_p - z_q], which gives the divergence in the same
// pass: KL(p || q) = E_p[z_p - z_q] - lse_p + lse_q); warp shuffles and shared memory merge
// them across the block in a fixed order, so results are deterministic. JSD takes one more
// pass for its row constants. The last pass writes the gradient times grad_scale, which is
// read on the device: nothing here synchronises with the host. Indexing is 64-bit.
// The per-element math is csrc/kd_loss.h, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kd_loss.h"

namespace lepton_fast {
namespace {

constexpr int kWarp = 32;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, kVec>*>(p);
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, kVec>& x) {
  *reinterpret_cast<Pack<scalar_t, kVec>*>(p) = x;
}

// Block-wide merge of per-thread softmax statistics; every thread gets the result.
// `smem` holds 3 values per warp. The tree is fixed, so the result is deterministic.
template <typename acc_t, int kThreads>
__device__ WeightedSoftmaxStats<acc_t> block_merge(WeightedSoftmaxStats<acc_t> st, acc_t* smem) {
  constexpr int kWarps = kThreads / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    WeightedSoftmaxStats<acc_t> o;
    o.max = __shfl_xor_sync(0xffffffffu, st.max, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, st.sum, offset);
    o.weighted = __shfl_xor_sync(0xffffffffu, st.weighted, offset);
    st.merge(o);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) {
    smem[warp] = st.max;
    smem[kWarps + warp] = st.sum;
    smem[2 * kWarps + warp] = st.weighted;
  }
  __syncthreads();
  WeightedSoftmaxStats<acc_t> total;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    WeightedSoftmaxStats<acc_t> o;
    o.max = smem[w];
    o.sum = smem[kWarps + w];
    o.weighted = smem[2 * kWarps + w];
    total.merge(o);
  }
  return total;
}

template <typename acc_t, int kThreads>
__device__ acc_t block_sum(acc_t v, acc_t* smem) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t total = smem[0];
#pragma unroll
  for (int w = 1; w < kThreads / kWarp; ++w) total += smem[w];
  return total;
}

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
  __shared__ acc_t smem_stats[3 * (kThreads / kWarp)];
  __shared__ acc_t smem_sum[kThreads / kWarp];

  const int64_t row = blockIdx.x;
  const scalar_t* s = student + row * s_stride;
  const scalar_t* t = teacher + row * t_stride;
  scalar_t* g = grad + row * n_classes;
  const int64_t first = int64_t(threadIdx.x) * kVec, step = int64_t(kThreads) * kVec;
  const int64_t label = p.has_labels ? labels[row] : -1;

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
    st_s = block_merge<acc_t, kThreads>(st_s, smem_stats);
    st_t = block_merge<acc_t, kThreads>(st_t, smem_stats);
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
      div = block_sum<acc_t, kThreads>(d_part, smem_sum);
      k_s = block_sum<acc_t, kThreads>(k_part, smem_sum);
    }
    row_loss = acc_t(p.soft_weight) * div;
  }
  const acc_t eps = p.label_smoothing, smooth = eps / acc_t(n_classes);
  if (p.needs_ce) {
    st_1 = block_merge<acc_t, kThreads>(st_1, smem_stats);
    lse_1 = st_1.lse();
    acc_t ce = lse_1 - (1 - eps) * acc_t(s[label]);
    // Only with smoothing: a masked (-inf) logit makes the sum -inf, and 0 * -inf is NaN.
    if (eps > 0) ce -= smooth * block_sum<acc_t, kThreads>(sum_x, smem_sum);
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

// 16 bytes per load when every row of every operand starts on a 16-byte boundary.
template <typename scalar_t>
bool rows_aligned(const at::Tensor& x, int64_t row_stride) {
  constexpr int64_t kBytes = 16;
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % kBytes == 0 && (row_stride * int64_t(sizeof(scalar_t))) % kBytes == 0;
}

template <typename scalar_t, int kVec, int kThreads>
void launch_kd(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& grad,
               at::Tensor& loss, const at::Tensor& grad_scale, const KDParams& p) {
  const int64_t n_rows = student.size(0);
  kd_loss_kernel<scalar_t, kVec, kThreads><<<n_rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), labels,
      p.compute_grad ? grad.data_ptr<scalar_t>() : nullptr, loss.data_ptr<at::opmath_type<scalar_t>>(),
      grad_scale.data_ptr<float>(), student.size(1), student.stride(0), teacher.stride(0), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, double temperature, c10::string_view divergence, double beta,
    double alpha, double label_smoothing, int64_t ignore_index, bool scale_by_t2, bool compute_grad) {
  check_kd_inputs(student, teacher, labels, grad_scale);
  const KDParams p = make_kd_params(temperature, divergence, beta, alpha, label_smoothing, ignore_index, scale_by_t2,
                                    labels.has_value(), compute_grad);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t n_rows = student.size(0), n_classes = student.size(1);
  TORCH_CHECK(n_rows <= int64_t(std::numeric_limits<int32_t>::max()), "kd_loss_forward: at most 2^31 - 1 rows");
  at::Tensor labels64;
  if (labels) {
    labels64 = labels->to(at::kLong).contiguous();
  }
  auto loss = at::empty({n_rows}, student.options().dtype(at::toOpMathType(student.scalar_type())));
  auto grad = compute_grad ? at::empty({n_rows, n_classes}, student.options()) : at::empty({0}, student.options());
  if (n_rows == 0 || n_classes == 0) return {loss, grad};
  const int64_t* y = labels ? labels64.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = rows_aligned<scalar_t>(student, student.stride(0)) &&
                     rows_aligned<scalar_t>(teacher, teacher.stride(0)) && n_classes % kVec == 0;
    // Wide rows get more threads per row; narrow rows fewer, so more rows share an SM.
    const bool wide = n_classes >= 8192;
    if (vec && wide) {
      launch_kd<scalar_t, kVec, 1024>(student, teacher, y, grad, loss, grad_scale, p);
    } else if (vec) {
      launch_kd<scalar_t, kVec, 128>(student, teacher, y, grad, loss, grad_scale, p);
    } else if (wide) {
      launch_kd<scalar_t, 1, 1024>(student, teacher, y, grad, loss, grad_scale, p);
    } else {
      launch_kd<scalar_t, 1, 128>(student, teacher, y, grad, loss, grad_scale, p);
    }
  });
  return {loss, grad};
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
    if (per_row) {
      vec ? launch_scale<scalar_t, kVec, true>(grad, factor, n_classes)
          : launch_scale<scalar_t, 1, true>(grad, factor, n_classes);
    } else {
      vec ? launch_scale<scalar_t, kVec, false>(grad, factor, n_classes)
          : launch_scale<scalar_t, 1, false>(grad, factor, n_classes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("kd_loss_forward", &kd_loss_forward_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace lepton_fast
