// CUDA scale_grad_, the backward of the fused losses: grad *= scale in place (schema in
// lepton_fast/ops/scale_grad.py; the CPU kernel is csrc/cpu/scale_grad.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "common.cuh"

namespace lepton_fast {
namespace {

using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;

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

TORCH_LIBRARY_IMPL(lepton_fast, CUDA, m) { m.impl("scale_grad_", &scale_grad_cuda); }

}  // namespace lepton_fast
