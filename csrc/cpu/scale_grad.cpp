// CPU scale_grad_, the backward of the fused losses: grad *= scale in place.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common.h"

namespace lepton_fast {
namespace {

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale) {
  LF_CHECK_DEVICE(scale, grad);
  if (scale.dim() == 0) {
    // The usual grad_output of a loss is exactly 1: no pass over the gradient at all.
    if (!is_cpu_one(scale)) grad.mul_(scale);
    return;
  }
  TORCH_CHECK(grad.dim() == 2 && scale.dim() == 1 && scale.size(0) == grad.size(0),
              "scale_grad_: scale must be 0-d or [N] for an [N, C] grad");
  // Computed in the scale's precision and rounded once to the gradient's dtype.
  grad.mul_(scale.unsqueeze(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("scale_grad_", &scale_grad_cpu); }

}  // namespace lepton_fast
