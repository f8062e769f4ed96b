"""grad_reverse: the gradient-reversal layer of domain-adversarial training (Ganin et al. 2016).

The forward is the identity and must not copy, so it is a view of the input; a
torch.library custom op may not return an alias of an input, so the forward is the
autograd.Function below (which torch.compile traces) and the backward, -lambda * grad, is
the custom op ``lepton_fast::grad_reverse_backward`` (fake impl and its own autograd, so
that double backward works and opcheck applies).
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from lepton_fast import _validate, reference


@torch.library.custom_op("lepton_fast::grad_reverse_backward", mutates_args=())
def grad_reverse_backward(grad: Tensor, lambda_: Tensor) -> Tensor:
    """-lambda_ * grad in grad's dtype; lambda_ is 0-d (any device: a CPU scalar is fine)."""
    return reference.grad_reverse_backward(grad, lambda_)


@grad_reverse_backward.register_fake
def _(grad, lambda_):
    return torch.empty_like(grad)


def _backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_backward(ctx, grad_grad):
    (lambda_,) = ctx.saved_tensors
    return grad_reverse_backward(grad_grad, lambda_), None


grad_reverse_backward.register_autograd(_backward_backward, setup_context=_backward_setup)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, lambda_: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (lambda_,) = ctx.saved_tensors
        return grad_reverse_backward(grad, lambda_), None


def grad_reverse(x: Tensor, lambda_: Union[float, Tensor] = 1.0) -> Tensor:
    r"""Gradient reversal (Ganin et al. 2016, DANN): the identity forward, ``-lambda_ * grad``
    backward, so a feature extractor learns to *fool* the domain classifier behind it.

    Args:
        x: any shape, float32, bfloat16, float16 or float64.
        lambda_: reversal weight, a finite float or a 0-d tensor. A tensor (for example a
            schedule's buffer, see :class:`lepton_fast.nn.GradientReversal`) lets the value
            change without torch.compile recompiling; it is read on the device, no sync.

    Returns:
        ``x`` itself as a view: same storage, no copy. Its gradient is
        ``-lambda_ * grad_output`` in ``x``'s dtype.

    Raises:
        TypeError: non-tensor or non-floating ``x``; ``lambda_`` neither a number nor a
            floating 0-d tensor.
        ValueError: ``lambda_`` not finite (a float) or not 0-d (a tensor).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if isinstance(lambda_, Tensor):
        if lambda_.dim() != 0:
            raise ValueError(f"lambda_ must be a float or a 0-d tensor, got shape {tuple(lambda_.shape)}")
        if not lambda_.is_floating_point():
            raise TypeError(f"lambda_ must be a floating-point tensor, got {lambda_.dtype}")
        lam = lambda_.detach()
    else:
        if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)):
            raise TypeError(f"lambda_ must be a float or a 0-d tensor, got {type(lambda_).__name__}")
        if not math.isfinite(lambda_):
            raise ValueError(f"lambda_ must be finite, got {lambda_}")
        # A CPU scalar tensor multiplies tensors on any device without a copy to it.
        lam = torch.scalar_tensor(float(lambda_), dtype=torch.float64)
    return _GradReverse.apply(x, lam)
