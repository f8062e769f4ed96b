"""scale_grad_: the backward of the fused losses (grad *= grad_output, in place).

The losses write d(loss)/d(logits) during the forward; their autograd kernels
(csrc/autograd.cpp) call this op in the backward. It is an op of its own, with kernels per
device, so that a grad_output of exactly 1 (a plain ``loss.backward()``) is recognised on the
device and costs no pass over the gradient and no host synchronisation.
"""
from __future__ import annotations

import torch

from lepton_fast import _backend

SPEC = _backend.register("scale_grad_", triton="scale_grad", public=False)

if _backend.extension().module is not None:

    @torch.library.register_fake("lepton_fast::scale_grad_")
    def _(grad, scale):
        return None
