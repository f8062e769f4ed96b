"""scale_grad_: the backward of the fused losses (grad *= grad_output, in place).

The losses write d(loss)/d(logits) during the forward; their autograd kernels
(csrc/autograd.cpp, ops/_autograd.py) call this op in the backward. It is an op of its own, with kernels per
device, so that a grad_output of exactly 1 (a plain ``loss.backward()``) is recognised on the
device and costs no pass over the gradient and no host synchronisation.
"""
from __future__ import annotations

import torch

from lepton_fast import _backend

# grad *= scale in place, scale 0-d (skipped, on the device, when exactly 1) or [N] (one factor
# per row of the [N, C] grad).
SPEC = _backend.define("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()", triton="scale_grad", public=False)


@torch.library.register_fake("lepton_fast::scale_grad_")
def _(grad, scale):
    return None
