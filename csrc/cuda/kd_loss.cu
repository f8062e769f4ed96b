// CUDA kernels of fused_kd_loss and the kd_slice_* ops (schemas in lepton_fast/ops/kd_loss.py).
//
// One thread block per row, running the steps of csrc/kd_loss.h that its op asks for
// (fused_kd_loss: all of them, in one launch); the block walks the row with 16-byte vector
// loads when every row is 16-byte aligned. Step 1 keeps online softmax statistics of student
// and teacher (and, for forward/reverse KL, E_p[z_p - z_q], which gives the divergence in the
// same pass: KL(p || q) = E_p[z_p - z_q] - lse_p + lse_q), each the max of the raw logits and
// exponents (x - max) / T (csrc/kd_loss.h, KDRowStats); a block reduction in a fixed tree
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
#include "softmax_stats.cuh"

namespace lepton_fast {
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

// The rows of one launch (KDMode says which op): the CPU's KDRows (csrc/cpu/kd_loss_cpu.h)
// with typed pointers.
template <typename scalar_t>
struct KDRows {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  KDMode mode;
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;  // or nullptr
  scalar_t* grad;  // kFused, kSlice when p.compute_grad
  acc_t* loss;  // [N]: kFused, kSlice
  const acc_t* stats;  // [N, kNumKDStats] merged: kJSDSums, kSlice
  const acc_t* jsd;  // [N, 2] merged: kSlice with JSD
  acc_t* out;  // kStats: [N, kNumKDStats]; kJSDSums: [N, 2]
  const float* grad_scale;  // 0-d, on the device
  int64_t slice_classes, class_offset, n_classes, s_stride, t_stride;
  KDParams p;
};

// The steps of one row (csrc/kd_loss.h) on its C columns at s and t, by one thread block:
// thread k reads the packs at first = k * kVec, first + step, ...; every block-wide result is
// returned to every thread. `label` is the label's column among the C, or -1.
template <typename scalar_t, int kVec, int kThreads>
struct BlockRow {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const scalar_t* s;
  const scalar_t* t;
  int64_t C;
  int64_t first = int64_t(threadIdx.x) * kVec;
  int64_t step = int64_t(kThreads) * kVec;

  // Step 1. Online softmax statistics of student and teacher (with the sum A that gives a KL in
  // the same pass, kl_from_sums), at T = 1 for the CE, and the CE's linear part.
  __device__ KDRowStats<acc_t> stats(const KDParams& p, int64_t label, int64_t n_classes) const {
    const acc_t inv_t = p.inv_temperature, label_smoothing = p.label_smoothing;
    const bool fwd = p.divergence == Divergence::kForwardKL, rev = p.divergence == Divergence::kReverseKL;
    const bool ce_own = p.needs_ce && (!p.needs_soft || inv_t != acc_t(1));
    const bool smoothing = p.needs_ce && label_smoothing > 0;
    KLSums<acc_t> st;  // p = the teacher for forward KL, else the student (A unused for JSD)
    st.set_scale(inv_t);
    SoftmaxStats<acc_t> st_1;
    acc_t sum_x = 0;
    for (int64_t i = first; i < C; i += step) {
      const P xs = load_pack<scalar_t, kVec>(s + i);
      P xt;
      if (p.needs_soft) xt = load_pack<scalar_t, kVec>(t + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t x = acc_t(xs.v[k]);
        if (p.needs_soft) {
          const acc_t y = acc_t(xt.v[k]);
          st.add(fwd ? y : x, fwd ? x : y);  // (p, q)
        }
        if (ce_own) st_1.add(x);
        if (smoothing) sum_x += x;
      }
    }
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    KDRowStats<acc_t> r{kNegInf, kNegInf, 0, 0, 0, 0, 0};
    if (p.needs_soft) {
      st = block_reduce(st);
      const SoftmaxStats<acc_t>& st_s = fwd ? st.q : st.p;
      const SoftmaxStats<acc_t>& st_t = fwd ? st.p : st.q;
      r.max_s = st_s.max;
      r.sum_s = st_s.sum;
      r.max_t = st_t.max;
      r.sum_t = st_t.sum;
      r.kl = fwd || rev ? st.a : acc_t(0);
      r.sum_ce = r.sum_s;
    }
    if (p.needs_ce) {
      if (ce_own) {
        st_1 = block_reduce(st_1);
        if (!p.needs_soft) r.max_s = st_1.max;
        // Against max_s, the same max of the same logits (so the factor is 1).
        r.sum_ce = st_1.sum > 0 ? st_1.sum * std::exp(st_1.max - r.max_s) : acc_t(0);
      }
      const acc_t total_x = smoothing ? block_reduce(Sum<acc_t>{sum_x}).value : acc_t(0);
      r.lin_ce = ce_linear_part(label >= 0, label >= 0 ? acc_t(s[label]) : acc_t(0), total_x, label_smoothing,
                                n_classes);
    }
    return r;
  }

  // Step 2 (JSD): K_t = KL(p_t || m) and K_s = KL(p_s || m) over the columns, backwards (see sweep);
  // log p = (x - max) / T - lse from the row's maxima and log-sums (log_sum in csrc/common.h).
  __device__ void jsd_sums(const KDParams& p, acc_t max_s, acc_t lse_s, acc_t max_t, acc_t lse_t, acc_t& k_t,
                           acc_t& k_s) const {
    const acc_t inv_t = p.inv_temperature, log_beta = std::log(acc_t(p.beta)), log_1m_beta = std::log1p(-acc_t(p.beta));
    acc_t t_part = 0, s_part = 0;
    sweep(C, first, step, /*reverse=*/true, [&](int64_t i) {
      const P xs = load_pack<scalar_t, kVec>(s + i), xt = load_pack<scalar_t, kVec>(t + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t lps = (acc_t(xs.v[k]) - max_s) * inv_t - lse_s, lpt = (acc_t(xt.v[k]) - max_t) * inv_t - lse_t;
        const acc_t lm = log_mixture_of<ScalarMath<acc_t>>(lps, lpt, log_beta, log_1m_beta);
        t_part += kl_term(lpt, lm);
        s_part += kl_term(lps, lm);
      }
    });
    k_t = block_reduce(Sum<acc_t>{t_part}).value;
    k_s = block_reduce(Sum<acc_t>{s_part}).value;
  }

  // Step 4: d(row loss)/d(student) * gs into g.
  __device__ void grad(scalar_t* g, int64_t label, const KDRowConsts<acc_t>& c, const KDParams& p, acc_t gs,
                       int64_t n_classes, bool reverse) const {
    const acc_t inv_t = p.inv_temperature, beta = p.beta, label_smoothing = p.label_smoothing;
    const acc_t log_beta = std::log(beta), log_1m_beta = std::log1p(-beta), smooth = label_smoothing / acc_t(n_classes);
    const acc_t soft_w = acc_t(p.soft_grad_weight) * gs, ce_w = acc_t(p.alpha) * gs;
    sweep(C, first, step, reverse, [&](int64_t i) {
      const P xs = load_pack<scalar_t, kVec>(s + i);
      P xt, out;
      if (p.needs_soft) xt = load_pack<scalar_t, kVec>(t + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t x = acc_t(xs.v[k]);
        acc_t d = 0;
        if (p.needs_soft) {
          const acc_t lps = (x - c.max_s) * inv_t - c.lse_s, lpt = (acc_t(xt.v[k]) - c.max_t) * inv_t - c.lse_t;
          d = soft_w * soft_grad(p.divergence, lps, lpt, c.k, beta, log_beta, log_1m_beta);
        }
        if (p.needs_ce) {
          d += ce_w * (std::exp(x - c.lse_ce) - smooth - (i + k == label ? 1 - label_smoothing : acc_t(0)));
        }
        out.v[k] = static_cast<scalar_t>(d);
      }
      store_pack(g + i, out);
    });
  }
};

// One thread block per row, running the steps a.mode asks for.
template <typename scalar_t, int kVec, int kThreads>
__global__ void __launch_bounds__(kThreads) kd_rows_kernel(const KDRows<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const KDParams& p = a.p;
  const int64_t row = blockIdx.x;
  const BlockRow<scalar_t, kVec, kThreads> r{a.student + row * a.s_stride, a.teacher + row * a.t_stride,
                                             a.slice_classes};
  const int64_t label = p.has_labels ? a.labels[row] : -1;
  const bool ignored = p.has_labels && label == p.ignore_index;
  // The labels' range, checked where they are read (as ATen's nll_loss does on the GPU);
  // kJSDSums reads them only to skip ignored rows.
  CUDA_KERNEL_ASSERT(!p.has_labels || ignored || a.mode == KDMode::kJSDSums || (label >= 0 && label < a.n_classes));
  const int64_t column = label - a.class_offset;
  const int64_t label_here = p.has_labels && !ignored && column >= 0 && column < a.slice_classes ? column : -1;
  const bool jsd = p.needs_soft && p.divergence == Divergence::kJSD;

  if (a.mode == KDMode::kStats) {
    const KDRowStats<acc_t> st =
        ignored ? KDRowStats<acc_t>{0, 0, 0, 0, 0, 0, 0} : r.stats(p, label_here, a.n_classes);
    if (threadIdx.x == 0) st.store(a.out + row * kNumKDStats);
    return;
  }
  if (a.mode == KDMode::kJSDSums) {
    acc_t k_t = 0, k_s = 0;
    if (!ignored) {
      const auto st = KDRowStats<acc_t>::load(a.stats + row * kNumKDStats);
      r.jsd_sums(p, st.max_s, log_sum(st.max_s, st.sum_s), st.max_t, log_sum(st.max_t, st.sum_t), k_t, k_s);
    }
    if (threadIdx.x == 0) {
      a.out[row * 2] = k_t;
      a.out[row * 2 + 1] = k_s;
    }
    return;
  }

  // kFused, kSlice: the row's loss and its columns' gradient.
  scalar_t* g = p.compute_grad ? a.grad + row * a.slice_classes : nullptr;
  if (ignored) {
    if (threadIdx.x == 0) a.loss[row] = 0;
    if (g) {
      Pack<scalar_t, kVec> zero;
#pragma unroll
      for (int k = 0; k < kVec; ++k) zero.v[k] = scalar_t(0);
      for (int64_t i = r.first; i < a.slice_classes; i += r.step) store_pack(g + i, zero);
    }
    return;
  }
  KDRowStats<acc_t> st;
  acc_t k_t = 0, k_s = 0;
  if (a.mode == KDMode::kFused) {
    st = r.stats(p, label_here, a.n_classes);
    if (jsd) r.jsd_sums(p, st.max_s, log_sum(st.max_s, st.sum_s), st.max_t, log_sum(st.max_t, st.sum_t), k_t, k_s);
  } else {
    st = KDRowStats<acc_t>::load(a.stats + row * kNumKDStats);
    if (jsd) {
      k_t = a.jsd[row * 2];
      k_s = a.jsd[row * 2 + 1];
    }
  }
  const KDRowConsts<acc_t> c = kd_row_consts(st, p, k_t, k_s);
  if (threadIdx.x == 0) a.loss[row] = c.loss;
  // Against the direction of the pass before (JSD's step 2 went backwards).
  if (g) r.grad(g, label_here, c, p, acc_t(*a.grad_scale), a.n_classes, /*reverse=*/!jsd);
}

template <typename scalar_t, int kVec, int kThreads>
void launch_kd(const KDRows<scalar_t>& a, int64_t n_rows) {
  kd_rows_kernel<scalar_t, kVec, kThreads><<<n_rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What every op's host code shares: the checks, then one launch over the rows of the slice
// (n_classes 0: labels only mark ignored rows, kJSDSums).
struct KDLaunch {
  KDMode mode;
  const at::Tensor& student;
  const at::Tensor& teacher;
  const std::optional<at::Tensor>& labels;
  const KDParams& p;
  int64_t class_offset;
  int64_t n_classes;
  at::Tensor labels64;

  KDLaunch(const char* op, KDMode mode, const at::Tensor& student, const at::Tensor& teacher,
           const std::optional<at::Tensor>& labels, const KDParams& p, int64_t class_offset, int64_t n_classes)
      : mode(mode), student(student), teacher(teacher), labels(labels), p(p), class_offset(class_offset),
        n_classes(n_classes) {
    check_kd_inputs(op, student, teacher, labels, class_offset, n_classes);
    TORCH_CHECK(student.size(0) <= int64_t(std::numeric_limits<int32_t>::max()), op, ": at most 2^31 - 1 rows");
    if (labels) {
      labels64 = labels->contiguous();
      LF_CHECK_DTYPE(labels64, at::kLong);
    }
  }

  at::ScalarType acc_type() const { return at::toOpMathType(student.scalar_type()); }

  // Runs the kernel with the output pointers set by `outputs(KDRows<scalar_t>&)`. A slice
  // without columns still has rows: their statistics of nothing, or their loss.
  template <typename F>
  void run(const at::Tensor& grad_scale, F&& outputs) const {
    const int64_t n_rows = student.size(0), slice_classes = student.size(1);
    if (n_rows == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_cuda", [&] {
      KDRows<scalar_t> a{mode, student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
                         labels ? labels64.const_data_ptr<int64_t>() : nullptr, nullptr, nullptr, nullptr, nullptr,
                         nullptr, grad_scale.const_data_ptr<float>(), slice_classes, class_offset, n_classes,
                         student.stride(0), teacher.stride(0), p};
      outputs(a);
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = cuda::rows_aligned16<scalar_t>(student.const_data_ptr(), student.stride(0)) &&
                       cuda::rows_aligned16<scalar_t>(teacher.const_data_ptr(), teacher.stride(0)) &&
                       slice_classes % kVec == 0;
      cuda::launch_row_blocks<kVec>(vec, slice_classes, [&](auto vec_c, auto threads_c) {
        launch_kd<scalar_t, decltype(vec_c)::value, decltype(threads_c)::value>(a, n_rows);
      });
    });
  }
};

// fused_kd_loss (no stats) or kd_slice_loss: the loss as `reduction` asks, and the gradient.
std::tuple<at::Tensor, at::Tensor> loss_and_grad(
    const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor* stats, const std::optional<at::Tensor>& jsd_sums,
    const at::Tensor& hyper, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, int64_t class_offset, int64_t n_classes,
    bool compute_grad) {
  const KDParams p = make_kd_params(hyper, ignore_index, labels.has_value(), compute_grad);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const KDLaunch launch(op, stats ? KDMode::kSlice : KDMode::kFused, student_logits, teacher_logits, labels, p,
                        class_offset, n_classes);
  const bool jsd = p.needs_soft && p.divergence == Divergence::kJSD;
  if (stats) {
    check_merged_stats(op, *stats, student_logits, kNumKDStats);
    TORCH_CHECK(!jsd || jsd_sums.has_value(), op, ": the JSD needs jsd_sums");
    if (jsd) check_merged_stats(op, *jsd_sums, student_logits, 2);
  }
  const Reduction how = parse_reduction(reduction);
  const int64_t n_rows = student_logits.size(0);
  // What a "mean" divides by: the rows not ignored (counted on the device, at least 1), or
  // num_items_in_batch. Its reciprocal scales the gradient, read by the kernel on the device.
  at::Tensor divisor;
  if (num_items_in_batch) {
    divisor = num_items_in_batch->to(student_logits.device(), at::kFloat);
  } else if (how == Reduction::kMean) {
    divisor = labels ? (launch.labels64 != ignore_index).sum().clamp_min(1).to(at::kFloat)
                     : at::scalar_tensor(static_cast<double>(std::max<int64_t>(n_rows, 1)),
                                         student_logits.options().dtype(at::kFloat));
  }
  const at::Tensor grad_scale =
      divisor.defined() && how != Reduction::kNone ? divisor.reciprocal()
                                                   : at::ones({}, student_logits.options().dtype(at::kFloat));
  const auto acc_type = launch.acc_type();
  auto rows = at::empty({n_rows}, student_logits.options().dtype(acc_type));
  auto grad = compute_grad ? at::empty_like(student_logits, at::MemoryFormat::Contiguous)
                           : at::empty({0}, student_logits.options());
  launch.run(grad_scale, [&](auto& a) {
    using s_t = typename std::decay_t<decltype(a)>::scalar_type;
    using a_t = typename std::decay_t<decltype(a)>::acc_t;
    a.loss = rows.data_ptr<a_t>();
    if (compute_grad) a.grad = grad.data_ptr<s_t>();
    if (stats) a.stats = stats->const_data_ptr<a_t>();
    if (stats && jsd) a.jsd = jsd_sums->const_data_ptr<a_t>();
  });
  // A row whose softmax is undefined came out NaN: an error at the next synchronisation.
  at::_assert_async(at::logical_not(at::isnan(rows).any()),
                    stats ? "kd_slice_loss: a row of student_logits or teacher_logits is entirely -inf, or holds "
                            "+inf or NaN, so its softmax is undefined"
                          : "fused_kd_loss: a row of student_logits or teacher_logits is entirely -inf, or holds "
                            "+inf or NaN, so its softmax is undefined");
  if (how == Reduction::kNone) return {rows, grad};
  at::Tensor total = rows.sum();
  return {divisor.defined() ? total / divisor.to(acc_type) : total, grad};
}

std::tuple<at::Tensor, at::Tensor> fused_kd_loss_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& hyper, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  return loss_and_grad("fused_kd_loss", student_logits, teacher_logits, labels, nullptr, std::nullopt, hyper,
                       ignore_index, reduction, num_items_in_batch, 0, student_logits.size(-1), compute_grad);
}

std::tuple<at::Tensor, at::Tensor> kd_slice_loss_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& stats, const std::optional<at::Tensor>& jsd_sums, const at::Tensor& hyper, int64_t ignore_index,
    c10::string_view reduction, const std::optional<at::Tensor>& num_items_in_batch, int64_t class_offset,
    int64_t n_classes, bool compute_grad) {
  return loss_and_grad("kd_slice_loss", student_logits, teacher_logits, labels, &stats, jsd_sums, hyper, ignore_index,
                       reduction, num_items_in_batch, class_offset, n_classes, compute_grad);
}

at::Tensor kd_slice_stats_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                               const std::optional<at::Tensor>& labels, const at::Tensor& hyper,
                               int64_t ignore_index, int64_t class_offset, int64_t n_classes) {
  const KDParams p = make_kd_params(hyper, ignore_index, labels.has_value(), false);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const KDLaunch launch("kd_slice_stats", KDMode::kStats, student_logits, teacher_logits, labels, p, class_offset,
                        n_classes);
  auto out = at::empty({student_logits.size(0), kNumKDStats}, student_logits.options().dtype(launch.acc_type()));
  const auto one = at::ones({}, student_logits.options().dtype(at::kFloat));
  launch.run(one, [&](auto& a) { a.out = out.data_ptr<typename std::decay_t<decltype(a)>::acc_t>(); });
  return out;
}

at::Tensor kd_slice_jsd_sums_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                  const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                  const at::Tensor& hyper, int64_t ignore_index) {
  const KDParams p = make_kd_params(hyper, ignore_index, labels.has_value(), false);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const KDLaunch launch("kd_slice_jsd_sums", KDMode::kJSDSums, student_logits, teacher_logits, labels, p, 0, 0);
  check_merged_stats("kd_slice_jsd_sums", stats, student_logits, kNumKDStats);
  auto out = at::empty({student_logits.size(0), 2}, student_logits.options().dtype(launch.acc_type()));
  const auto one = at::ones({}, student_logits.options().dtype(at::kFloat));
  launch.run(one, [&](auto& a) {
    using a_t = typename std::decay_t<decltype(a)>::acc_t;
    a.stats = stats.const_data_ptr<a_t>();
    a.out = out.data_ptr<a_t>();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("fused_kd_loss", &fused_kd_loss_cuda);
  m.impl("kd_slice_stats", &kd_slice_stats_cuda);
  m.impl("kd_slice_jsd_sums", &kd_slice_jsd_sums_cuda);
  m.impl("kd_slice_loss", &kd_slice_loss_cuda);
}

}  // namespace lepton_fast
