"""Backward of the fused losses: scale the gradient the forward already wrote.

The losses write d(loss)/d(logits) during the forward into one buffer; the backward only
multiplies it, in place, by grad_output (0-d for "mean"/"sum", [N] for "none"). Working in
place keeps the peak at one gradient buffer. A second backward through the same graph
(retain_graph=True) then fails with autograd's "modified by an inplace operation" error
instead of returning a gradient scaled twice.

Under tracing (torch.compile, AOTAutograd) the backward is out of place instead: the traced
graph may also return the buffer, and the compiler plans memory itself.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lepton_fast import _backend

SPEC = _backend.register("scale_grad_", kernel="scale_grad_", triton="scale_grad")


@torch.library.custom_op("lepton_fast::scale_grad", mutates_args=("grad",))
def scale_grad_(grad: Tensor, scale: Tensor, backend: str) -> None:
    """grad *= scale (0-d, or [N] broadcast over rows of the [N, C] grad).

    Skipping the multiply when a 0-d scale is exactly 1 (the usual grad_output of a loss)
    saves a read and a write of the whole buffer; the GPU kernels test that on the
    device, so that no backend synchronises with the host.
    """
    if backend in ("cuda", "triton") and grad.is_cuda:
        kernel = (
            torch.ops.lepton_fast.scale_grad_ if backend == "cuda" else _backend.triton_kernels(SPEC).scale_grad_
        )
        kernel(grad, scale)
        return
    scale = scale.to(torch.float32)
    if scale.dim() == 0:
        if grad.device.type == "cpu" and float(scale) == 1.0:
            return
        grad.mul_(scale)
    else:
        grad.mul_(scale.reshape(-1, 1))


@scale_grad_.register_fake
def _(grad, scale, backend):
    return None


def backward_scaled(grad: Tensor, grad_output: Tensor, backend: str) -> Tensor:
    """The input gradient of a fused loss from its saved gradient and grad_output."""
    if is_fake(grad):
        return grad * (grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)).to(grad.dtype)
    scale_grad_(grad, grad_output, backend)
    return grad
