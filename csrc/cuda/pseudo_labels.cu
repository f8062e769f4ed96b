// CUDA kernels of select_pseudo_labels and fused_pseudo_label_loss (schemas in lepton_fast/ops/pseudo_labels.py).
//
// One thread block per row; the block walks the row with 16-byte vector loads when every row
// is 16-byte aligned. Pass 1 reads the weak view: online arg-max and softmax statistics,
// merged by a block reduction in a fixed tree, so results are deterministic. A row of
// weight 0 then stores loss 0 (and a zero gradient) and never reads its strong view, which
// may hold anything. Pass 2 reads the strong view: its softmax statistics and, for the soft
// target q = softmax(w / T), sum_j q_j s_j; pass 3 writes the gradient times the row's
// weight and grad_scale (1 / N for a mean, a kernel argument). Nothing here synchronises
// with the host; rows whose softmax is undefined are reported by at::_assert_async.
// Indexing is 64-bit. The per-row math is csrc/pseudo_labels.h, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../pseudo_labels.h"
#include "common.cuh"

namespace lepton_fast {

// The warp exchange block_reduce needs, beside the statistic's type (found by ADL).
template <typename acc_t>
__device__ __forceinline__ ArgmaxSoftmax<acc_t> shfl_xor(const ArgmaxSoftmax<acc_t>& a, int lane_mask) {
  ArgmaxSoftmax<acc_t> o = a;  // the same scale in every thread
  o.max = __shfl_xor_sync(0xffffffffu, a.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, a.sum, lane_mask);
  o.arg = __shfl_xor_sync(0xffffffffu, static_cast<long long>(a.arg), lane_mask);
  return o;
}

namespace {

using cuda::block_reduce;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::Sum;

// The kernel's tensors, as raw pointers (strong, grad and loss are nullptr for select).
template <typename scalar_t>
struct Rows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* strong;
  const scalar_t* weak;
  const acc_t* class_thresholds;  // [C] or nullptr
  const acc_t* weights;  // [N] or nullptr
  scalar_t* grad;  // [N, C] contiguous, or nullptr unless compute_grad
  acc_t* loss;  // [N]
  int64_t* labels;
  acc_t* confidence;
  bool* mask;
  int64_t n_classes;
  int64_t strong_stride;
  int64_t weak_stride;
};

template <typename scalar_t, int kVec, int kThreads, bool kLoss, bool kSoft>
__global__ void __launch_bounds__(kThreads) pseudo_label_kernel(const Rows<scalar_t> a, const PseudoLabelParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;

  const int64_t row = blockIdx.x, n_classes = a.n_classes;
  const scalar_t* w = a.weak + row * a.weak_stride;
  const int64_t first = int64_t(threadIdx.x) * kVec, step = int64_t(kThreads) * kVec;
  const acc_t inv_t = p.inv_temperature;

  // Pass 1: the weak view. Each thread adds its columns in increasing order, so a tie keeps
  // the lowest index, as the merge does.
  ArgmaxSoftmax<acc_t> st_w;
  st_w.scale = inv_t;
  for (int64_t i = first; i < n_classes; i += step) {
    const P x = load_pack<scalar_t, kVec>(w + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) st_w.add(acc_t(x.v[k]), i + k);
  }
  st_w = block_reduce(st_w);
  const int64_t label = st_w.arg;
  const acc_t conf = confidence_from_sum(st_w.max, st_w.sum);
  bool selected;
  const acc_t weight = row_weight(conf, label, a.class_thresholds, a.weights, row, acc_t(p.threshold), &selected);
  if (threadIdx.x == 0) {
    a.labels[row] = label;
    a.confidence[row] = conf;
    a.mask[row] = selected;
  }
  if constexpr (kLoss) {
    scalar_t* g = a.grad + row * n_classes;
    if (weight == acc_t(0)) {
      if (threadIdx.x == 0) a.loss[row] = 0;
      if (p.compute_grad) {
        P zero;
#pragma unroll
        for (int k = 0; k < kVec; ++k) zero.v[k] = scalar_t(0);
        for (int64_t i = first; i < n_classes; i += step) store_pack(g + i, zero);
      }
      return;
    }

    // Pass 2: the strong view, and the soft target's sum_j q_j s_j.
    const scalar_t* s = a.strong + row * a.strong_stride;
    const acc_t log_sum_w = log_sum(st_w.max, st_w.sum);
    ArgmaxSoftmax<acc_t> st_s;
    Sum<acc_t> dot;
    for (int64_t i = first; i < n_classes; i += step) {
      const P xs = load_pack<scalar_t, kVec>(s + i);
      P xw;
      if constexpr (kSoft) xw = load_pack<scalar_t, kVec>(w + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t x = acc_t(xs.v[k]);
        st_s.add(x, i + k);
        if constexpr (kSoft) dot.value += target_term(std::exp(st_w.log_prob(acc_t(xw.v[k]), log_sum_w)), x);
      }
    }
    st_s = block_reduce(st_s);
    if constexpr (kSoft) dot = block_reduce(dot);
    const acc_t lse_s = lse_from_sum(st_s.max, st_s.sum);
    if (threadIdx.x == 0) a.loss[row] = weight * (lse_s - (kSoft ? dot.value : acc_t(s[label])));
    if (!p.compute_grad) return;

    // Pass 3: d(row loss)/d(strong) * grad_scale = gw (p - target).
    const acc_t gw = weight * acc_t(p.grad_scale);
    for (int64_t i = first; i < n_classes; i += step) {
      const P xs = load_pack<scalar_t, kVec>(s + i);
      P xw, out;
      if constexpr (kSoft) xw = load_pack<scalar_t, kVec>(w + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc_t target;
        if constexpr (kSoft) {
          target = std::exp(st_w.log_prob(acc_t(xw.v[k]), log_sum_w));
        } else {
          target = i + k == label ? acc_t(1) : acc_t(0);
        }
        out.v[k] = static_cast<scalar_t>(gw * (std::exp(acc_t(xs.v[k]) - lse_s) - target));
      }
      store_pack(g + i, out);
    }
  }
}

template <typename scalar_t, int kVec, int kThreads>
void launch_rows(const Rows<scalar_t>& a, int64_t n_rows, const PseudoLabelParams& p) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (a.strong == nullptr) {
    pseudo_label_kernel<scalar_t, kVec, kThreads, false, false><<<n_rows, kThreads, 0, stream>>>(a, p);
  } else {
    BOOL_SWITCH(p.soft, kSoft, [&] {
      pseudo_label_kernel<scalar_t, kVec, kThreads, true, kSoft><<<n_rows, kThreads, 0, stream>>>(a, p);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Outputs {
  at::Tensor rows, grad, labels, confidence, mask;
};

// Runs the kernel on every row (`strong` undefined: select only).
Outputs launch(const at::Tensor& strong, const at::Tensor& weak, const std::optional<at::Tensor>& class_thresholds,
               const std::optional<at::Tensor>& weights, const PseudoLabelParams& p) {
  const c10::cuda::CUDAGuard guard(weak.device());
  const int64_t n_rows = weak.size(0), n_classes = weak.size(1);
  TORCH_CHECK(n_rows <= int64_t(std::numeric_limits<int32_t>::max()), "pseudo-labels: at most 2^31 - 1 rows");
  const bool loss = strong.defined();
  const auto acc_type = at::toOpMathType(weak.scalar_type());
  const auto options = weak.options();
  // In the accumulation type, as the comparisons and products use them (no-ops when the
  // Python layer already made them so).
  const at::Tensor thresholds = class_thresholds ? class_thresholds->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor row_weights = weights ? weights->to(acc_type).contiguous() : at::Tensor();
  Outputs out{loss ? at::empty({n_rows}, options.dtype(acc_type)) : at::Tensor(),
              loss && p.compute_grad ? at::empty_like(strong, at::MemoryFormat::Contiguous) : at::empty({0}, options),
              at::empty({n_rows}, options.dtype(at::kLong)), at::empty({n_rows}, options.dtype(acc_type)),
              at::empty({n_rows}, options.dtype(at::kBool))};
  if (n_rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weak.scalar_type(), "pseudo_labels_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<scalar_t> a{loss ? strong.const_data_ptr<scalar_t>() : nullptr,
                           weak.const_data_ptr<scalar_t>(),
                           thresholds.defined() ? thresholds.const_data_ptr<acc_t>() : nullptr,
                           row_weights.defined() ? row_weights.const_data_ptr<acc_t>() : nullptr,
                           loss && p.compute_grad ? out.grad.data_ptr<scalar_t>() : nullptr,
                           loss ? out.rows.data_ptr<acc_t>() : nullptr,
                           out.labels.data_ptr<int64_t>(),
                           out.confidence.data_ptr<acc_t>(),
                           out.mask.data_ptr<bool>(),
                           n_classes,
                           loss ? strong.stride(0) : 0,
                           weak.stride(0)};
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = cuda::rows_aligned16<scalar_t>(weak.const_data_ptr(), weak.stride(0)) &&
                     (!loss || cuda::rows_aligned16<scalar_t>(strong.const_data_ptr(), strong.stride(0))) &&
                     n_classes % kVec == 0;
    // Wide rows get more threads per row; narrow rows fewer, so more rows share an SM.
    const bool wide = n_classes >= 8192;
    BOOL_SWITCH(vec, kVectorised, [&] {
      BOOL_SWITCH(wide, kWide, [&] { launch_rows<scalar_t, kVectorised ? kVec : 1, kWide ? 1024 : 128>(a, n_rows, p); });
    });
  });
  return out;
}

// A row whose softmax is undefined came out NaN: an error at the next synchronisation.
void assert_rows_defined(const at::Tensor& values, const char* op, const char* name) {
  at::_assert_async(at::logical_not(at::isnan(values).any()),
                    std::string(op) + ": a row of " + name +
                        " is entirely -inf, or holds +inf or NaN, so its softmax is undefined");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_pseudo_labels_cuda(
    const at::Tensor& logits, const at::Tensor& threshold, const at::Tensor& temperature,
    const std::optional<at::Tensor>& class_thresholds) {
  check_pseudo_label_inputs("select_pseudo_labels", logits, nullptr, class_thresholds, std::nullopt);
  const auto p = make_pseudo_label_params(threshold, temperature, false, false, 1.0);
  Outputs out = launch(at::Tensor(), logits, class_thresholds, std::nullopt, p);
  assert_rows_defined(out.confidence, "select_pseudo_labels", "logits");
  return {out.labels, out.confidence, out.mask};
}

PseudoLabelLossOutputs fused_pseudo_label_loss_cuda(const PseudoLabelLossCall& call) {
  constexpr const char* op = "fused_pseudo_label_loss";
  Outputs out = launch(call.strong_logits, call.weak_logits, call.class_thresholds, call.weights, call.p);
  assert_rows_defined(out.confidence, op, "weak_logits");
  assert_rows_defined(out.rows, op, "strong_logits");
  auto counts = at::zeros({call.weak_logits.size(1)}, out.labels.options());
  counts.index_add_(0, out.labels, out.mask.to(at::kLong));
  at::Tensor loss = out.rows;
  if (call.how == Reduction::kSum) loss = out.rows.sum();
  if (call.how == Reduction::kMean) loss = out.rows.sum() / call.divisor;
  return {loss, out.grad, out.labels, out.confidence, out.mask, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("select_pseudo_labels", &select_pseudo_labels_cuda);
  m.impl("fused_pseudo_label_loss", &fused_pseudo_label_loss_entry<&fused_pseudo_label_loss_cuda>);
}

}  // namespace lepton_fast
