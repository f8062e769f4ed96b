"""nn.Module wrappers of the lepton_fast ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lepton_fast import _validate
from lepton_fast.ops.grad_reverse import grad_reverse
from lepton_fast.ops.kd_loss import Scalar, fused_kd_loss


class KDLoss(nn.Module):
    """:func:`lepton_fast.fused_kd_loss` as a module, in the manner of ``nn.KLDivLoss``.

    The keyword arguments (those of :func:`~lepton_fast.fused_kd_loss` but the tensors:
    divergence, beta, alpha, label_smoothing, ignore_index, scale_by_t2, reduction,
    num_items_in_batch, backend) are fixed at construction and checked there by the
    function's own checks (``_validate.kd_options``), its defaults standing for those not
    given; only that ``alpha > 0`` needs ``labels`` is left to each call. See
    :func:`~lepton_fast.fused_kd_loss` for their meaning, shapes, dtypes and errors
    (Hinton et al. 2015).

    Shape: student_logits and teacher_logits [..., C]; labels [...] (optional); the loss is
    a float32 scalar, or [...] for ``reduction="none"``.

    Raises:
        TypeError: an unknown keyword, ``labels`` (pass them to the call), a value of the
            wrong type.
        ValueError: a value out of its range (temperature <= 0, alpha outside [0, 1], an
            unknown divergence or reduction, ...).
    """

    def __init__(self, temperature: Scalar = 1.0, **kwargs):
        super().__init__()
        if "labels" in kwargs:
            raise TypeError("KDLoss takes labels at each call, module(student_logits, teacher_logits, labels), "
                            "not at construction")
        _validate.kd_hyper_parameters(fused_kd_loss, temperature=temperature, **kwargs)
        self.temperature = temperature
        self.kwargs = kwargs

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return fused_kd_loss(student_logits, teacher_logits, self.temperature, labels=labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([f"temperature={self.temperature}"] + [f"{k}={v!r}" for k, v in self.kwargs.items()])


class GradientReversal(nn.Module):
    r"""Gradient-reversal layer (Ganin et al. 2016) with a fixed weight or the DANN schedule.

    The forward returns its input (a view, no copy); the backward multiplies the gradient
    by -λ. With ``total_steps`` the weight follows the DANN schedule

    .. math:: \lambda(p) = lo + (hi - lo)\left(\frac{2}{1 + e^{-\gamma p}} - 1\right),
              \quad p = \min(\mathrm{step} / \mathrm{total\_steps}, 1)

    rising from ``lo`` at step 0 towards ``hi`` (γ = 10 as in the paper). Call :meth:`step`
    once per optimiser step. The counter is a buffer, so ``state_dict()`` saves it and a
    resumed run continues the schedule; λ is computed on the buffer's device as a 0-d
    tensor, so neither the schedule nor torch.compile synchronises or recompiles.

    ``grl.lambda_`` is the current λ, a float32 0-d tensor on the buffer's device:
    ``float(grl.lambda_)`` reads it as a number (one host read, when you ask for it).

    Args:
        lambda_: the fixed weight (default 1.0); not allowed together with ``total_steps``.
        total_steps: length of the schedule in optimiser steps (> 0), or None for a fixed λ.
        lo, hi: the schedule's start and limit (default 0 and 1).
        gamma: the schedule's steepness γ > 0 (default 10).

    Raises:
        TypeError: a setting that is not a real number (``GradientReversal("1")``, a bool;
            pass ``1.0``), or a ``total_steps`` that is not an int.
        ValueError: a non-finite setting, ``gamma <= 0``, ``total_steps < 1``, or both
            ``lambda_`` and ``total_steps``.

    The state (``step_count``) is an int64 counter: nothing non-finite can enter it.

    Shape: any; the output is the input.
    """

    step_count: Tensor

    def __init__(self, lambda_: Optional[float] = None, *, total_steps: Optional[int] = None,
                 lo: float = 0.0, hi: float = 1.0, gamma: float = 10.0):
        super().__init__()
        if total_steps is not None:
            if lambda_ is not None:
                raise ValueError("give either a fixed lambda_ or a schedule (total_steps), not both")
            _validate.integer("total_steps", total_steps, 1)
        self.fixed_lambda = None if total_steps is not None else _validate.real(
            "lambda_", 1.0 if lambda_ is None else lambda_)
        self.total_steps = total_steps
        self.lo, self.hi = _validate.real("lo", lo), _validate.real("hi", hi)
        self.gamma = _validate.real("gamma", gamma, 0.0, lo_open=True)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))

    @property
    def lambda_(self) -> Tensor:
        """The current λ as a float32 0-d tensor on the buffer's device."""
        if self.total_steps is None:
            return torch.full((), self.fixed_lambda, dtype=torch.float32, device=self.step_count.device)
        p = (self.step_count.to(torch.float64) / self.total_steps).clamp(max=1.0)
        rise = 2.0 / (1.0 + torch.exp(-self.gamma * p)) - 1.0
        return (self.lo + (self.hi - self.lo) * rise).to(torch.float32)

    @torch.no_grad()
    def step(self) -> None:
        """Advance the schedule by one optimiser step (in place on the device, no sync)."""
        self.step_count += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.total_steps is None:
            return grad_reverse(x, self.fixed_lambda)
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        if self.total_steps is None:
            return f"lambda_={self.fixed_lambda}"
        return f"total_steps={self.total_steps}, lo={self.lo}, hi={self.hi}, gamma={self.gamma}"
