"""grad_reverse: the gradient-reversal layer of domain-adversarial training (Ganin et al. 2016).

The forward is the identity and must not copy, so it is a view of the input. A custom op may
not return an alias of an input (functionalization refuses it under torch.compile), so the
layer is an autograd.Function whose backward is ``-lambda * grad``: eager, torch.compile and
double backward differentiate it.

torch.func transforms and forward-mode AD are the exception. Under torch.compile, Dynamo
traces the tensors inside a transform (torch.func.grad, vjp, jacrev, ...) with
requires_grad=False and inlines an autograd.Function's forward without its backward:
``torch.compile(torch.func.grad(f))`` gave the unreversed gradient, silently (a PyTorch fault,
present in torch 2.11-2.14). Eager transforms need rules the Function would have to restate
(vmap, and a jvp for jacfwd and forward_ad, which Dynamo refuses to trace: a graph break).
Wherever a transform or a forward-AD level is active, the layer is therefore written with
differentiable torch ops instead, ``x + (t - t.detach())`` with ``t = -lambda * x``: the same
value, ``-lambda`` as its derivative in reverse and forward mode, and every transform and
torch.compile handle it. It is a new tensor, not a view, which a transform cannot observe.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor
from torch.autograd import forward_ad

from lepton_fast import _validate


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
        return grad * -lambda_, None


def _reversed_by_ops(x: Tensor, lambda_: Tensor) -> Tensor:
    t = x * -lambda_
    # t - t.detach() is exactly 0 where t is finite; elsewhere (x = +-inf, NaN) the zero is
    # written out, so the value stays x (that element's gradient is then 0).
    zero = torch.where(torch.isfinite(t), t - t.detach(), 0.0)
    return x.detach() + zero


def grad_reverse(x: Tensor, lambda_: Union[float, Tensor] = 1.0) -> Tensor:
    r"""Gradient reversal (Ganin et al., "Domain-Adversarial Training of Neural Networks",
    JMLR 2016): the identity forward, ``-lambda_ * grad`` backward, so a feature extractor
    learns to *fool* the domain classifier behind it.

    Works under eager autograd, ``torch.compile`` (fullgraph), ``torch.func`` transforms
    (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``vmap``) and transforms under
    ``torch.compile``; forward-mode derivatives are ``-lambda_`` too, as the backward.

    Args:
        x: any shape, float32, bfloat16, float16 or float64.
        lambda_: reversal weight, a finite number or a 0-d floating tensor on any device. A
            tensor (for example a schedule's buffer, see :class:`lepton_fast.nn.GradientReversal`)
            lets the value change without torch.compile recompiling, and so does a number
            (it travels as a 0-d tensor) except as an argument of a function that
            ``torch.func.grad`` wraps, which torch specialises: pass a tensor there. A device
            tensor is read on the device, no sync.

    Returns:
        ``x`` itself as a view: same storage, no copy (inside a ``torch.func`` transform, a
        new tensor of the same values). Its gradient is ``-lambda_ * grad_output`` in ``x``'s
        dtype.

    Raises:
        TypeError: non-tensor or non-floating ``x``; ``lambda_`` neither a number nor a
            floating tensor.
        ValueError: ``lambda_`` not 0-d, or not finite (checked at once for a number or a CPU
            tensor, asynchronously on a device).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if isinstance(lambda_, Tensor) and not lambda_.is_floating_point():
        raise TypeError(f"lambda_ must be a floating-point tensor, got {lambda_.dtype}")
    if isinstance(lambda_, Tensor) and lambda_.device.type != "cpu":
        if lambda_.dim() != 0:
            raise ValueError(f"lambda_ must be a number or a 0-d tensor, got shape {tuple(lambda_.shape)}")
        _validate.no_grad_wanted("lambda_", lambda_)
        lam = lambda_.detach()
        _validate.no_bad_values(~torch.isfinite(lam), "lambda_ must be finite")
    else:
        lam = _validate.hyper("lambda_", lambda_)
    # Dynamo evaluates both flags while it traces, so a compiled graph takes the same branch.
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return _reversed_by_ops(x, lam)
    return _GradReverse.apply(x, lam)
