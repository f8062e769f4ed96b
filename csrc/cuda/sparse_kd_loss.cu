// CUDA kernel of sparse_kd_loss (schema: lepton_fast/ops/sparse_kd_loss.py), the contract of
// the reference kernel and of the CPU kernel (csrc/cpu/sparse_kd_loss.cpp), whose per-row
// maths it shares: csrc/sparse_kd_loss.h.
//
// One thread block per row. The block marks the columns its counted entries list in a bitmap
// in shared memory (V / 8 bytes: at most kMaxClasses = 327680 classes), so that the one pass over the
// student row (16-byte vector loads when every row is 16-byte aligned) gathers the online
// softmax statistics at T of the columns not listed ("tail") and at T = 1 of all of them (the
// CE) without a search. The entries are spread over the threads, their statistics and sums
// merged by block reductions in a fixed tree (deterministic). The gradient is written in the
// same launch: the row's columns by the unlisted formula, then, after a barrier, the entries'
// columns. Indices and labels are range-checked on the device where they are read (as ATen's
// nll_loss does); the scale of the gradient is read on the device: nothing here synchronises
// with the host. Indexing is 64-bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../sparse_kd_loss.h"
#include "common.cuh"
#include "softmax_stats.cuh"

namespace lepton_fast {
namespace {

using cuda::block_reduce;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::Sum;

// The bitmap of listed columns, 40 KiB at most: beside block_reduce's buffers, within the 48 KiB
// of shared memory a launch gets without opting in (and above every LLM vocabulary, 262144).
constexpr int64_t kMaxClasses = int64_t(40) * 1024 * 8;

template <typename scalar_t>
struct SparseArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const int64_t* indices;
  const acc_t* logprobs;  // converted to the accumulation dtype
  const bool* mask;  // or nullptr
  const int64_t* labels;  // or nullptr
  scalar_t* grad;  // or nullptr
  acc_t* loss;  // [N]
  const float* grad_scale;  // 0-d, on the device
  int64_t n_classes, k, s_stride;
  bool tail;
  KDParams p;
};

template <typename scalar_t, int kVec, int kThreads>
__global__ void __launch_bounds__(kThreads) sparse_kd_rows_kernel(const SparseArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Stats = SoftmaxStats<acc_t>;
  using P = Pack<scalar_t, kVec>;
  extern __shared__ uint32_t listed_bits[];
  const KDParams& p = a.p;
  const int64_t row = blockIdx.x, V = a.n_classes, K = a.k;
  const int64_t first = int64_t(threadIdx.x) * kVec, step = int64_t(kThreads) * kVec;
  const scalar_t* s = a.student + row * a.s_stride;
  scalar_t* g = p.compute_grad ? a.grad + row * V : nullptr;
  const int64_t* idx = a.indices + row * K;
  const acc_t* lp = a.logprobs + row * K;
  const bool* mk = a.mask ? a.mask + row * K : nullptr;
  const int64_t label = p.has_labels ? a.labels[row] : -1;
  const bool ignored = p.has_labels && label == p.ignore_index;
  CUDA_KERNEL_ASSERT(!p.has_labels || ignored || (label >= 0 && label < V));
  if (ignored) {
    if (threadIdx.x == 0) a.loss[row] = 0;
    if (g) {
      P zero;
#pragma unroll
      for (int k = 0; k < kVec; ++k) zero.v[k] = scalar_t(0);
      for (int64_t i = first; i < V; i += step) store_pack(g + i, zero);
    }
    return;
  }
  // An entry counts where its mask is True and no earlier such entry holds its index.
  auto counts = [&](int64_t k) {
    if (mk && !mk[k]) return false;
    for (int64_t j = 0; j < k; ++j) {
      if ((!mk || mk[j]) && idx[j] == idx[k]) return false;
    }
    return true;
  };
  const acc_t inv_t = p.inv_temperature, beta = p.beta, label_smoothing = p.label_smoothing;
  const acc_t log_beta = std::log(beta), log_1m_beta = std::log1p(-beta);
  const bool row_tail = a.tail && p.needs_soft;

  for (int64_t w = threadIdx.x; w < (V + 31) / 32; w += kThreads) listed_bits[w] = 0;
  __syncthreads();
  Stats teacher_t, teacher_1, student, unlisted, ce;
  teacher_t.scale = student.scale = unlisted.scale = inv_t;
  int64_t n_counted = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    CUDA_KERNEL_ASSERT((mk && !mk[k]) || (idx[k] >= 0 && idx[k] < V));  // teacher_indices in [0, V)
    if (!counts(k)) continue;
    atomicOr(&listed_bits[idx[k] / 32], 1u << (idx[k] % 32));
    teacher_t.add(lp[k]);
    teacher_1.add(lp[k]);
    student.add(acc_t(s[idx[k]]));
    ++n_counted;
  }
  __syncthreads();
  auto listed = [&](int64_t j) { return (listed_bits[j / 32] >> (j % 32)) & 1u; };

  // The pass over the row.
  acc_t sum_x = 0;
  if (row_tail || p.needs_ce) {
    for (int64_t i = first; i < V; i += step) {
      const P xs = load_pack<scalar_t, kVec>(s + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t x = acc_t(xs.v[k]);
        if (row_tail && !listed(i + k)) unlisted.add(x);
        if (p.needs_ce) {
          ce.add(x);
          sum_x += x;
        }
      }
    }
  }
  acc_t row_loss = 0, big_g = 0, g_tail = 0;
  SparseRowConsts<acc_t> c{};
  if (p.needs_soft) {
    teacher_t = block_reduce(teacher_t);
    teacher_1 = block_reduce(teacher_1);
    student = block_reduce(student);
    if (row_tail) unlisted = block_reduce(unlisted);
    const int64_t total = block_reduce(Sum<int64_t>{n_counted}).value;
    c = sparse_row_consts(a.tail, total == V, inv_t, teacher_t, teacher_1, student, unlisted);
    acc_t d = 0;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      if (!counts(k)) continue;
      const SparseBucket<acc_t> b =
          sparse_bucket(p.divergence, c.logp(lp[k]), c.logq(acc_t(s[idx[k]])), beta, log_beta, log_1m_beta);
      d += b.d;
      big_g += b.g;
    }
    d = block_reduce(Sum<acc_t>{d}).value;
    big_g = block_reduce(Sum<acc_t>{big_g}).value;
    if (a.tail) {
      const SparseBucket<acc_t> b = sparse_bucket(p.divergence, c.logp_tail, c.logq_tail, beta, log_beta, log_1m_beta);
      d += b.d;
      big_g += g_tail = b.g;
    }
    row_loss = acc_t(p.soft_weight) * d;
  }
  acc_t lse1 = 0;
  if (p.needs_ce) {
    ce = block_reduce(ce);
    lse1 = lse_from_sum(ce.max, ce.sum);
    const acc_t total_x = label_smoothing > 0 ? block_reduce(Sum<acc_t>{sum_x}).value : acc_t(0);
    row_loss += acc_t(p.alpha) * (lse1 - ce_linear_part(true, acc_t(s[label]), total_x, label_smoothing, V));
  }
  if (threadIdx.x == 0) a.loss[row] = row_loss;
  if (!g) return;

  const acc_t gs = *a.grad_scale;
  const acc_t sg = acc_t(p.soft_grad_weight) * gs, cg = acc_t(p.alpha) * gs, smooth = label_smoothing / acc_t(V);
  auto ce_grad = [&](int64_t j, acc_t x) {
    return cg * (std::exp(x - lse1) - smooth - (j == label ? 1 - label_smoothing : acc_t(0)));
  };
  for (int64_t i = first; i < V; i += step) {  // the unlisted columns' formula (the entries' come next)
    const P xs = load_pack<scalar_t, kVec>(s + i);
    P out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t x = acc_t(xs.v[k]);
      acc_t dv = row_tail ? sg * sparse_unlisted_grad(c, x, g_tail, big_g) : acc_t(0);
      if (p.needs_ce) dv += ce_grad(i + k, x);
      out.v[k] = static_cast<scalar_t>(dv);
    }
    store_pack(g + i, out);
  }
  if (!p.needs_soft) return;
  __syncthreads();  // the entries' columns over the values just written, by other threads
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    if (!counts(k)) continue;
    const acc_t x = acc_t(s[idx[k]]), logq = c.logq(x);
    const SparseBucket<acc_t> b = sparse_bucket(p.divergence, c.logp(lp[k]), logq, beta, log_beta, log_1m_beta);
    acc_t dk = (b.g - std::exp(logq) * big_g) * sg;
    if (p.needs_ce) dk += ce_grad(idx[k], x);
    g[idx[k]] = static_cast<scalar_t>(dk);
  }
}

template <typename scalar_t, int kVec, int kThreads>
void launch_sparse(const SparseArgs<scalar_t>& a, int64_t n_rows) {
  const size_t smem = sizeof(uint32_t) * static_cast<size_t>((a.n_classes + 31) / 32);
  sparse_kd_rows_kernel<scalar_t, kVec, kThreads>
      <<<n_rows, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cuda(const SparseKDLossCall& c) {
  const at::Tensor& student_logits = c.student_logits;
  const int64_t n = student_logits.size(0), v = student_logits.size(1);
  TORCH_CHECK(n <= int64_t(std::numeric_limits<int32_t>::max()), "sparse_kd_loss: at most 2^31 - 1 rows");
  TORCH_CHECK(v <= kMaxClasses, "sparse_kd_loss: the CUDA kernel takes at most ", kMaxClasses, " classes, got ", v,
              "; backend=\"triton\" takes any number");
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const auto acc_type = at::toOpMathType(student_logits.scalar_type());
  // What a "mean" divides by: the rows not ignored (counted on the device, at least 1), or
  // num_items_in_batch; its reciprocal scales the gradient, read by the kernel on the device.
  at::Tensor divisor;
  if (c.num_items_in_batch) {
    divisor = c.num_items_in_batch->to(student_logits.device(), at::kFloat);
  } else if (c.how == Reduction::kMean) {
    divisor = c.labels.defined() ? (c.labels != c.p.ignore_index).sum().clamp_min(1).to(at::kFloat)
                                 : at::scalar_tensor(static_cast<double>(std::max<int64_t>(n, 1)),
                                                     student_logits.options().dtype(at::kFloat));
  }
  const at::Tensor grad_scale = divisor.defined() && c.how != Reduction::kNone
                                    ? divisor.reciprocal()
                                    : at::ones({}, student_logits.options().dtype(at::kFloat));
  auto rows = at::empty({n}, student_logits.options().dtype(acc_type));
  auto grad = c.p.compute_grad ? at::empty_like(student_logits, at::MemoryFormat::Contiguous)
                               : at::empty({0}, student_logits.options());
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(), "sparse_kd_loss_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const SparseArgs<scalar_t> a{student_logits.const_data_ptr<scalar_t>(), c.indices.const_data_ptr<int64_t>(),
                                   c.logprobs.const_data_ptr<acc_t>(),
                                   c.mask.defined() ? c.mask.const_data_ptr<bool>() : nullptr,
                                   c.labels.defined() ? c.labels.const_data_ptr<int64_t>() : nullptr,
                                   c.p.compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
                                   rows.mutable_data_ptr<acc_t>(), grad_scale.const_data_ptr<float>(), v,
                                   c.indices.size(1), student_logits.stride(0), c.tail, c.p};
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = cuda::rows_aligned16<scalar_t>(student_logits.const_data_ptr(), student_logits.stride(0)) &&
                       v % kVec == 0;
      cuda::launch_row_blocks<kVec>(vec, v, [&](auto vec_c, auto threads_c) {
        launch_sparse<scalar_t, decltype(vec_c)::value, decltype(threads_c)::value>(a, n);
      });
    });
  }
  // A row whose buckets are undefined came out NaN: an error at the next synchronisation.
  at::_assert_async(at::logical_not(at::isnan(rows).any()),
                    "sparse_kd_loss: a row of student_logits or teacher_logprobs is entirely -inf, or holds +inf or "
                    "NaN, so its softmax is undefined");
  if (c.how == Reduction::kNone) return {rows, grad};
  const at::Tensor total = rows.sum();
  return {divisor.defined() ? total / divisor.to(acc_type) : total, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) { m.impl("sparse_kd_loss", &sparse_kd_loss_entry<&sparse_kd_loss_cuda>); }

}  // namespace lepton_fast
