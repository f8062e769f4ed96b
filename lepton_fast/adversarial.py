"""Attack and regulariser helpers built on the fused steps: fgsm, pgd, vat_loss.

All three leave the model as they found it: its train/eval mode is not changed (put the
model in eval mode first to attack with BatchNorm's running statistics), BatchNorm running
statistics are not updated by the extra forwards, and the gradient with respect to the
input comes from torch.autograd.grad, so the parameters' accumulated ``.grad`` is never
read, zeroed or added to.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lepton_fast.ops.adversarial import Scalar, _check_input, _check_size, fgsm_perturb, pgd_step_

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm layers in training mode normalise with the batch statistics as usual, but
    do not write their running statistics (nor num_batches_tracked) inside this block."""
    changed = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _input_grad(model: nn.Module, x_adv: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: Scalar, loss_fn: LossFn = F.cross_entropy, *,
         clamp=(0.0, 1.0), backend: Optional[str] = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): ``clamp(x + eps·sign(∇x loss))``.

    Args:
        model: maps x to logits (or whatever ``loss_fn`` takes).
        x: clean inputs [N, ...] (images in [0, 1] with the default ``clamp``).
        y: targets for ``loss_fn``: labels, or pseudo-labels of an unlabeled target domain.
            For a targeted attack pass a ``loss_fn`` that returns the negated loss.
        eps: L-inf budget, a float >= 0 or a per-sample tensor [N].
        loss_fn: ``loss_fn(model(x), y)`` -> scalar to increase (default cross-entropy).
        clamp: valid input range, or None.
        backend: forwarded to :func:`lepton_fast.fgsm_perturb`.

    Returns:
        Adversarial inputs like ``x``, detached.

    Raises:
        The errors of :func:`lepton_fast.fgsm_perturb` for ``x``, ``eps``, ``clamp``.
    """
    _check_input("x", x)
    _check_size("eps", eps, x)
    with frozen_batchnorm_stats(model):
        grad = _input_grad(model, x, y, loss_fn)
    return fgsm_perturb(x, grad, eps, clamp, backend=backend)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: Scalar, step_size: Scalar, steps: int,
        random_start: bool = True, loss_fn: LossFn = F.cross_entropy, *, clamp=(0.0, 1.0),
        generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> Tensor:
    """L-inf projected gradient descent (Madry et al. 2018), as torchattacks' PGD.

    Starts from ``x`` (or, with ``random_start``, a uniform point of the eps-ball, clamped),
    then takes ``steps`` fused :func:`lepton_fast.pgd_step` steps of size ``step_size``.

    Args:
        model, y, loss_fn, clamp, backend: as :func:`fgsm`.
        x: clean inputs [N, ...].
        eps: L-inf radius, a float >= 0 or a per-sample tensor [N].
        step_size: a float >= 0 or a per-sample tensor [N] (commonly 2.5·eps/steps).
        steps: number of steps >= 0.
        random_start: start from a uniform random point in the ball (Madry et al.).
        generator: the random start's torch.Generator (default: the global one).

    Returns:
        Adversarial inputs like ``x``, detached, within eps of ``x`` in L-inf.

    Raises:
        ValueError: ``steps`` < 0, and the errors of :func:`lepton_fast.pgd_step`.
    """
    _check_input("x", x)
    _check_size("eps", eps, x)
    _check_size("step_size", step_size, x)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    x = x.detach()
    x_adv = x.clone(memory_format=torch.contiguous_format)
    if random_start:
        noise = torch.empty_like(x_adv).uniform_(-1.0, 1.0, generator=generator)
        # pgd_step with a zero step projects and clamps the random start in the same pass.
        x_adv = pgd_step_(x_adv.add_(noise.mul_(_broadcast(eps, x))), x, noise, 0.0, eps, clamp, backend=backend)
    elif clamp is not None:
        x_adv = x_adv.clamp_(*clamp)
    with frozen_batchnorm_stats(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, loss_fn)
            pgd_step_(x_adv, x, grad, step_size, eps, clamp, backend=backend)
    return x_adv


def _broadcast(value: Scalar, like: Tensor):
    if isinstance(value, Tensor):
        return value.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
    return value


def _unit_rows(d: Tensor) -> Tensor:
    """Each sample's direction scaled to unit L2 norm. Dividing by the max first keeps tiny
    gradients (the power iteration's are O(xi^2)) away from underflow, as Miyato et al. do."""
    flat = d.reshape(d.shape[0], -1)
    flat = flat / (flat.abs().amax(dim=1, keepdim=True) + 1e-12)
    flat = flat / torch.sqrt(1e-6 + flat.square().sum(dim=1, keepdim=True))
    return flat.reshape(d.shape)


def _kl_batchmean(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) summed over classes, averaged over samples (0 log 0 = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1).mean()


def vat_loss(model: nn.Module, x: Tensor, xi: float = 1e-6, eps: float = 1.0, power_iterations: int = 1, *,
             logits: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Virtual adversarial training loss (Miyato et al. 2018), the local distributional smoothness

    .. math:: \mathrm{KL}\big(p(\cdot|x)\,\|\,p(\cdot|x + r_{adv})\big),\quad
              r_{adv} = \epsilon\, \frac{g}{\|g\|_2},\ g = \nabla_r \mathrm{KL}(p(\cdot|x) \| p(\cdot|x + r))|_{r = \xi d}

    found by ``power_iterations`` rounds of power iteration from a random unit direction d
    (per sample, L2 over all non-batch dims, so [N, F] features and [N, C, H, W] images both
    work). Needs no labels. Runs with autocast disabled and in float32 (float64 stays
    float64): a perturbation of size xi = 1e-6 vanishes in float16 or bfloat16.

    Args:
        model: maps x to logits [N, C]; must accept float32 input.
        x: inputs [N, ...], floating.
        xi: finite-difference radius of the power iteration (> 0).
        eps: L2 norm of the adversarial perturbation (> 0).
        power_iterations: >= 1.
        logits: ``model(x)`` if already computed (its prediction is the constant target);
            otherwise computed here without a graph.
        generator: for the random initial direction.

    Returns:
        A float32 scalar with a graph to the model's parameters (through the forward at
        x + r_adv only; the target p(·|x) is a constant).

    Raises:
        TypeError: non-floating ``x``. ValueError: ``xi`` or ``eps`` <= 0,
        ``power_iterations`` < 1.
    """
    _check_input("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [N, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:  # an empty batch has loss 0, as the fused losses' "mean" does
        return sum(p.sum() for p in model.parameters()) * 0.0
    for name, value in (("xi", xi), ("eps", eps)):
        if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 1:
        raise ValueError(f"power_iterations must be an integer >= 1, got {power_iterations!r}")
    with torch.autocast(x.device.type, enabled=False), frozen_batchnorm_stats(model):
        x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        with torch.no_grad():
            target = (model(x) if logits is None else logits).detach()
        logp = torch.log_softmax(target.to(x.dtype), dim=-1)
        d = _unit_rows(torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator))
        for _ in range(power_iterations):
            d.requires_grad_(True)
            with torch.enable_grad():
                dist = _kl_batchmean(logp, torch.log_softmax(model(x + xi * d).to(x.dtype), dim=-1))
                (g,) = torch.autograd.grad(dist, d)
            d = _unit_rows(g.detach())
        logq = torch.log_softmax(model(x + eps * d).to(x.dtype), dim=-1)
        return _kl_batchmean(logp, logq)
