"""The autograd formula of the ops that write their gradient during the forward, in Python.

The fused losses (fused_kd_loss, kd_slice_loss, fused_pseudo_label_loss) return (loss,
d(loss)/d(first input), ...); their backward multiplies that saved gradient by grad_output, in
place (scale_grad_). With the compiled extension that formula is its C++ Autograd kernel
(csrc/autograd.cpp); without it, lepton_fast._backend.load_kernels registers this one, the same
formula with the same errors. fused_linear_kd_loss, a custom op written in Python, uses the
same pieces (:func:`check_backward`, :func:`times`).

The saved gradient is a constant: the fused kernels have no second derivative. A backward
asked to build a graph (create_graph=True, torch.func transforms) therefore raises instead of
silently dropping the Hessian term, and so does a second backward through the same graph (the
first one scaled the buffer). lepton_fast.reference's functions, plain autograd, give both.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_backward(ctx, op: str) -> None:
    """Refuse a second-order gradient, and a second backward through one graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: a second-order gradient was asked for (create_graph=True, or a torch.func transform), but the "
            "fused kernel computes the first-order gradient during the forward and has no derivative of its own. "
            f"Differentiate lepton_fast.reference.{op} (plain autograd) for higher-order gradients.")
    if ctx.used:
        raise RuntimeError(
            f"{op}: backward ran twice through the same graph (retain_graph=True); the first one consumed the "
            f"gradient the forward wrote. Compute the loss again for another backward, or differentiate "
            f"lepton_fast.reference.{op}.")
    ctx.used = True


def _traced(t: Tensor) -> bool:
    """A fake or functional tensor of torch.compile's tracing, or another tensor subclass."""
    return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)


def times(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad`` scaled by ``grad_loss`` (0-d, or [N]: one factor per row of ``grad``): in place
    (scale_grad_, nothing at all when it is exactly 1), or out of place for a traced tensor,
    where the saved gradient is also an output of the traced forward and must stay as it was."""
    if _traced(grad):
        factor = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(1)
        return (grad * factor).to(grad.dtype)
    torch.ops.lepton_fast.scale_grad_(grad, grad_loss)
    return grad


def register_saved_gradient(spec) -> None:
    """Register the autograd kernel of ``spec`` (an OpSpec with saves_grad): output 1 is
    d(output 0)/d(input 0), written when the last argument, compute_grad, is True."""

    def setup_context(ctx, inputs, output):
        if not inputs[-1] and inputs[0].requires_grad:
            raise RuntimeError(f"{spec.name}: compute_grad=False, but the logits require a gradient")
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.used = False
        ctx.n_inputs = len(inputs)

    def backward(ctx, grad_loss, *_):
        check_backward(ctx, spec.name)
        (grad,) = ctx.saved_tensors
        return (None if grad_loss is None else times(grad, grad_loss),) + (None,) * (ctx.n_inputs - 1)

    torch.library.register_autograd(spec.qualname, backward, setup_context=setup_context)
