// CUDA kernels of select_pseudo_labels and pseudo_label_loss_forward (math in ../pseudo_labels.h).
// One thread block per row. Pass 1 reads both views once (coalesced, strided by the block)
// and folds online softmax statistics and the weak arg-max into a block reduction; pass 2
// re-reads the row, which is still in L2, to write the gradient. Launched on the current
// stream; nothing synchronises with the host; all offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../pseudo_labels.h"

namespace lepton_fast {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;

template <typename acc_t>
struct RowStats {
  ArgmaxSoftmax<acc_t> weak;
  ArgmaxSoftmax<acc_t> strong;
  __device__ void merge(const RowStats& o) {
    weak.merge(o.weak);
    strong.merge(o.strong);
  }
};

template <typename acc_t>
__device__ ArgmaxSoftmax<acc_t> shfl_xor(const ArgmaxSoftmax<acc_t>& a, int lane_mask) {
  ArgmaxSoftmax<acc_t> o;
  o.max = __shfl_xor_sync(0xffffffffu, a.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, a.sum, lane_mask);
  o.arg = __shfl_xor_sync(0xffffffffu, static_cast<long long>(a.arg), lane_mask);
  return o;
}

template <typename acc_t>
__device__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& a, int lane_mask) {
  return {shfl_xor(a.weak, lane_mask), shfl_xor(a.strong, lane_mask)};
}

template <typename acc_t>
struct Sum {
  acc_t value = 0;
  __device__ void merge(const Sum& o) { value += o.value; }
};

template <typename acc_t>
__device__ Sum<acc_t> shfl_xor(const Sum<acc_t>& a, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, a.value, lane_mask)};
}

// Every thread gets the reduction of the block's values. blockDim.x is a multiple of 32.
template <typename T>
__device__ T block_reduce(T v) {
  __shared__ alignas(T) unsigned char storage[sizeof(T) * kMaxWarps];
  T* partial = reinterpret_cast<T*>(storage);
  for (int o = 16; o > 0; o >>= 1) v.merge(shfl_xor(v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (n_warps == 1) return v;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < n_warps ? partial[lane] : T{};
    for (int o = 16; o > 0; o >>= 1) w.merge(shfl_xor(w, o));
    if (lane == 0) partial[0] = w;
  }
  __syncthreads();
  return partial[0];
}

template <typename scalar_t, bool kLoss>
__global__ void __launch_bounds__(kMaxThreads) pseudo_label_kernel(
    const scalar_t* __restrict__ strong, const scalar_t* __restrict__ weak, const float* __restrict__ class_thresholds,
    const at::opmath_type<scalar_t>* __restrict__ weights, scalar_t* __restrict__ grad,
    at::opmath_type<scalar_t>* __restrict__ rows, int64_t* __restrict__ labels,
    at::opmath_type<scalar_t>* __restrict__ confidence, bool* __restrict__ mask, int64_t n_classes,
    int64_t strong_stride, int64_t weak_stride, PseudoLabelParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* w = weak + row * weak_stride;
  const scalar_t* s = strong + row * strong_stride;
  const acc_t inv_t = p.inv_temperature;

  RowStats<acc_t> st;
  for (int64_t j = threadIdx.x; j < n_classes; j += blockDim.x) {
    st.weak.add(acc_t(w[j]) * inv_t, j);
    if (kLoss) st.strong.add(acc_t(s[j]), j);
  }
  st = block_reduce(st);
  const int64_t label = st.weak.arg;
  const acc_t conf = confidence_from_sum(st.weak.max, st.weak.sum);
  bool selected;
  const acc_t weight = row_weight(conf, label, class_thresholds, weights, row, p.threshold, &selected);
  if (threadIdx.x == 0) {
    labels[row] = label;
    confidence[row] = conf;
    mask[row] = selected;
  }
  if (!kLoss) return;

  const bool keep = weight != acc_t(0);
  const acc_t lse_s = st.strong.max + std::log(st.strong.sum);
  const acc_t lse_w = st.weak.max + std::log(st.weak.sum);
  const acc_t gw = weight * acc_t(p.grad_scale);
  scalar_t* g = p.compute_grad ? grad + row * n_classes : nullptr;
  Sum<acc_t> dot;
  if (p.soft || g) {
    for (int64_t j = threadIdx.x; j < n_classes; j += blockDim.x) {
      const acc_t x = acc_t(s[j]);
      acc_t target;
      if (p.soft) {
        target = std::exp(acc_t(w[j]) * inv_t - lse_w);
        dot.value += target_term(target, x);
      } else {
        target = j == label ? acc_t(1) : acc_t(0);
      }
      if (g) g[j] = static_cast<scalar_t>(keep ? pseudo_label_grad(std::exp(x - lse_s), target, gw) : acc_t(0));
    }
  }
  if (p.soft) dot = block_reduce(dot);
  if (threadIdx.x == 0) {
    const acc_t target_dot = p.soft ? dot.value : acc_t(s[label]);
    rows[row] = keep ? weight * pseudo_label_ce(lse_s, target_dot) : acc_t(0);
  }
}

int threads_for(int64_t n_classes) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 4 < n_classes) threads *= 2;
  return threads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch(
    const at::Tensor& strong, const at::Tensor& weak, const std::optional<at::Tensor>& class_thresholds,
    const std::optional<at::Tensor>& weights, const PseudoLabelParams& p, bool loss) {
  const c10::cuda::CUDAGuard guard(weak.device());
  const int64_t n_rows = weak.size(0), n_classes = weak.size(1);
  TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max(), "pseudo-labels: at most 2^31 - 1 rows (one block each)");
  const auto acc_type = at::toOpMathType(weak.scalar_type());
  at::Tensor thresholds, row_weights;
  if (class_thresholds) {
    TORCH_CHECK(class_thresholds->numel() == n_classes, "class_thresholds must have C = ", n_classes, " entries");
    thresholds = class_thresholds->to(weak.device(), at::kFloat).contiguous();
  }
  if (weights) {
    TORCH_CHECK(weights->numel() == n_rows, "weights must have N = ", n_rows, " entries");
    row_weights = weights->to(weak.device(), acc_type).contiguous();
  }
  auto labels = at::empty({n_rows}, weak.options().dtype(at::kLong));
  auto confidence = at::empty({n_rows}, weak.options().dtype(acc_type));
  auto mask = at::empty({n_rows}, weak.options().dtype(at::kBool));
  auto rows = loss ? at::empty({n_rows}, weak.options().dtype(acc_type)) : at::empty({0}, weak.options().dtype(acc_type));
  auto grad = loss && p.compute_grad ? at::empty({n_rows, n_classes}, strong.options()) : at::empty({0}, strong.options());
  if (n_rows == 0) return {rows, grad, labels, confidence, mask};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = threads_for(n_classes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weak.scalar_type(), "pseudo_label_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const float* ct = class_thresholds ? thresholds.data_ptr<float>() : nullptr;
    const acc_t* wt = weights ? row_weights.data_ptr<acc_t>() : nullptr;
    scalar_t* g = loss && p.compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    acc_t* r = loss ? rows.data_ptr<acc_t>() : nullptr;
    if (loss) {
      pseudo_label_kernel<scalar_t, true><<<n_rows, threads, 0, stream>>>(
          strong.data_ptr<scalar_t>(), weak.data_ptr<scalar_t>(), ct, wt, g, r, labels.data_ptr<int64_t>(),
          confidence.data_ptr<acc_t>(), mask.data_ptr<bool>(), n_classes, strong.stride(0), weak.stride(0), p);
    } else {
      pseudo_label_kernel<scalar_t, false><<<n_rows, threads, 0, stream>>>(
          weak.data_ptr<scalar_t>(), weak.data_ptr<scalar_t>(), ct, nullptr, nullptr, nullptr,
          labels.data_ptr<int64_t>(), confidence.data_ptr<acc_t>(), mask.data_ptr<bool>(), n_classes,
          weak.stride(0), weak.stride(0), p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, grad, labels, confidence, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_pseudo_labels_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& class_thresholds, double threshold,
    double temperature) {
  check_rows(logits, "select_pseudo_labels", "logits");
  const auto p = make_pseudo_label_params(threshold, temperature, false, 1.0, false);
  auto out = launch(logits, logits, class_thresholds, std::nullopt, p, false);
  return {std::get<2>(out), std::get<3>(out), std::get<4>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pseudo_label_loss_forward_cuda(
    const at::Tensor& strong, const at::Tensor& weak, const std::optional<at::Tensor>& class_thresholds,
    const std::optional<at::Tensor>& weights, double threshold, double temperature, bool soft, double grad_scale,
    bool compute_grad) {
  check_views(strong, weak);
  const auto p = make_pseudo_label_params(threshold, temperature, soft, grad_scale, compute_grad);
  return launch(strong, weak, class_thresholds, weights, p, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) {
  m.impl("select_pseudo_labels", &select_pseudo_labels_cuda);
  m.impl("pseudo_label_loss_forward", &pseudo_label_loss_forward_cuda);
}

}  // namespace lepton_fast
