"""Attack and regulariser helpers built on the fused steps: fgsm, pgd, vat_loss.

All three leave the model as they found it: its train/eval mode is not changed (put the
model in eval mode first to attack with BatchNorm's running statistics), BatchNorm running
statistics are not updated by the extra forwards, and the gradient with respect to the
input comes from torch.autograd.grad, so the parameters' accumulated ``.grad`` is never
read, zeroed or added to. ``model`` is any callable; the BatchNorm layers found through an
``nn.Module``, a ``functools.partial`` of one or a module's bound method are the ones held
still (a lambda hides its modules: put them in eval mode, or pass the module).

Inputs in another space than [0, 1] (normalised images, features) need their own ``clamp``
(or ``None``): every step refuses, naming the fix, to move an input that lies outside the
clamp box by more than eps, instead of returning a point far outside the eps-ball.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lepton_fast import _validate
from lepton_fast.ops.adversarial import (
    Clamp, Scalar, check_input, clamp_bounds, fgsm_checked, operand, pgd_checked,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Model = Callable[[Tensor], Tensor]


def _module_of(model: Model) -> Optional[nn.Module]:
    while isinstance(model, functools.partial):
        model = model.func
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


@contextlib.contextmanager
def frozen_batchnorm_stats(model: Model):
    """BatchNorm layers in training mode normalise with the batch statistics as usual, but
    do not write their running statistics (nor num_batches_tracked) inside this block."""
    module = _module_of(model)
    changed = [] if module is None else [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _targets(y, x: Tensor, loss_fn: LossFn):
    """y as the default cross-entropy takes it: class indices [N] (or probabilities [N, C]) on
    x's device. A custom loss_fn gets y as given."""
    if loss_fn is not F.cross_entropy:
        return y
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y, device=x.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"y must be a tensor of class indices, got {type(y).__name__}") from None
    if y.dtype in _validate.INT_DTYPES:
        if y.shape != x.shape[:1]:
            raise ValueError(f"y must hold one class index per sample, shape ({x.shape[0]},), got {tuple(y.shape)}")
        return y.long()
    if not y.is_floating_point():
        raise TypeError(f"y must be class indices (an integer tensor) or class probabilities, got {y.dtype}")
    return y


def _check_classes(attack: str, y, logits: Tensor, loss_fn: LossFn) -> None:
    """The class indices of the default loss against the model's number of classes: F.cross_entropy
    would raise a bare IndexError (or assert on a GPU) at an index out of range."""
    if loss_fn is F.cross_entropy and isinstance(y, Tensor) and not y.is_floating_point() and logits.dim() == 2:
        _validate.labels_in_range(attack, y, logits.shape[1], -100, name="y")


def _input_grad(model: Model, x_adv: Tensor, y, loss_fn: LossFn, check_for: Optional[str]) -> Tensor:
    """d loss_fn(model(x_adv), y) / d x_adv; the classes of y checked first for ``check_for``,
    the attack's name, unless it is None."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        if check_for is not None:
            _check_classes(check_for, y, logits, loss_fn)
        (grad,) = torch.autograd.grad(loss_fn(logits, y), x_adv)
    return grad


@contextlib.contextmanager
def _errors_as(caller: str, op: str, arg: str):
    """The steps' kernels make the data checks and name their op and input (``pgd_step_:
    x_orig ...``); the user of an attack called ``caller`` with ``x``: their ValueErrors are
    re-raised under those names. (On a GPU the checks are device assertions, which name the
    op.)"""
    try:
        yield
    except ValueError as e:
        message = str(e)
        if message.startswith(op + ":"):
            e.args = (re.sub(rf"\b{arg}\b", "x", caller + message[len(op):]),)
        raise


_CLAMP_DOC = """clamp: ``(min, max)`` of the valid input range, each a number or a tensor that
    broadcasts to ``x``, or ``None``. The default suits images in [0, 1]; for a
    normalised image ``(image - mean) / std`` pass its per-channel box
    ``((0 - mean) / std, (1 - mean) / std)`` as two [C, 1, 1] tensors. An ``x``
    farther than eps outside the box is refused (ValueError, naming the fix)."""


def fgsm(model: Model, x: Tensor, y, eps: Scalar, loss_fn: LossFn = F.cross_entropy, *,
         clamp: Clamp = (0.0, 1.0), backend: Optional[str] = None) -> Tensor:
    """Fast gradient sign method (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing
    Adversarial Examples", ICLR 2015): ``clamp(x + eps·sign(∇x loss))``.

    Args:
        model: maps x to logits (or whatever ``loss_fn`` takes): any callable.
        x: clean inputs [N, ...].
        y: targets for ``loss_fn``: labels, or pseudo-labels of an unlabeled target domain.
            With the default loss, class indices [N] (a tensor or a list) or probabilities
            [N, C]. For a targeted attack pass a ``loss_fn`` that returns the negated loss.
        eps: L-inf budget >= 0: a number, a per-sample tensor [N], or a tensor that broadcasts
            to ``x`` (per channel, say).
        loss_fn: ``loss_fn(model(x), y)`` -> scalar to increase (default cross-entropy).
        CLAMP
        backend: forwarded to :func:`lepton_fast.fgsm_perturb`.

    Returns:
        Adversarial inputs like ``x``, detached, within eps of ``x`` in L-inf.

    Raises:
        ValueError: ``y`` out of the model's classes; the errors of
        :func:`lepton_fast.fgsm_perturb` for ``x``, ``eps``, ``clamp`` (as ``fgsm: x ...``).
    """
    check_input("x", x)
    eps = operand("eps", eps, x, non_negative=True)
    lo, hi = clamp_bounds(clamp, x)
    y = _targets(y, x, loss_fn)
    x = x.detach()
    with frozen_batchnorm_stats(model):
        grad = _input_grad(model, x, y, loss_fn, check_for="fgsm")
    with _errors_as("fgsm", "fgsm_perturb", "x"):
        return fgsm_checked(x, grad, eps, lo, hi, backend, in_place=False)


def pgd(model: Model, x: Tensor, y, eps: Scalar, step_size: Scalar, steps: int, random_start: bool = True,
        loss_fn: LossFn = F.cross_entropy, *, clamp: Clamp = (0.0, 1.0),
        generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> Tensor:
    """L-inf projected gradient descent (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards
    Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018), as torchattacks' PGD.

    Starts from ``x`` (or, with ``random_start``, a uniform point of the eps-ball, projected
    and clamped), then takes ``steps`` fused :func:`lepton_fast.pgd_step` steps.

    Args:
        model, y, loss_fn, backend: as :func:`fgsm`.
        x: clean inputs [N, ...].
        eps: L-inf radius >= 0, as :func:`fgsm`'s eps.
        step_size: >= 0, a number or a tensor as eps (commonly 2.5·eps/steps).
        steps: number of steps >= 0.
        random_start: start from a uniform random point in the ball (Madry et al.).
        CLAMP
        generator: the random start's torch.Generator (default: the global one).

    Returns:
        Adversarial inputs like ``x``, detached, within eps of ``x`` in L-inf.

    Raises:
        ValueError: ``steps`` < 0, ``y`` out of the model's classes, and the errors of
        :func:`lepton_fast.pgd_step`, its ``x_orig`` named as given (``pgd: x ...``).
    """
    check_input("x", x)
    eps = operand("eps", eps, x, non_negative=True)
    step = operand("step_size", step_size, x, non_negative=True)
    lo, hi = clamp_bounds(clamp, x)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    y = _targets(y, x, loss_fn)
    x = x.detach().contiguous()
    x_adv = x.clone()
    with _errors_as("pgd", "pgd_step_", "x_orig"):
        if random_start:
            noise = torch.empty_like(x_adv).uniform_(-1.0, 1.0, generator=generator)
            # A step of size 0 projects and clamps the random start in the same pass.
            x_adv.add_(noise.mul_(eps))
            pgd_checked(x_adv, x, noise, _validate.hyper("step_size", 0.0), eps, lo, hi, backend, in_place=True)
        with frozen_batchnorm_stats(model):
            for i in range(steps):
                grad = _input_grad(model, x_adv, y, loss_fn, check_for="pgd" if i == 0 else None)
                pgd_checked(x_adv, x, grad, step, eps, lo, hi, backend, in_place=True)
    return x_adv


def _unit_rows(d: Tensor, fallback: Tensor) -> Tensor:
    """Each sample's direction scaled to unit L2 norm, exactly: divided by its largest |entry|
    first (the power iteration's gradients are tiny, O(xi / N)), then by its norm, which is
    then >= 1; no additive constant that would shrink a small direction. A sample whose
    direction is all zero (or not finite) keeps ``fallback``'s."""
    flat = d.reshape(d.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True)
    usable = (scale > 0) & torch.isfinite(scale)
    flat = flat / torch.where(usable, scale, 1.0)
    norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    unit = flat / torch.where(usable, norm, 1.0)
    return torch.where(usable, unit, fallback.reshape(unit.shape)).reshape(d.shape)


def _kl_batchmean(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) summed over classes, averaged over samples (0 log 0 = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1).mean()


# The finite difference's radius relative to the rounding of x + r: where xi * d would lose
# more than 2^-11 of itself to the rounding of x (float32 and a few inputs of norm ~30 already
# at xi = 1e-6), the radius grows to 2^10 ulps of ||x||, ~1e-4 ||x|| in float32.
_ROUNDING_MARGIN = 2.0**10


def _probe_radius(x: Tensor, xi: float) -> Tensor:
    """Per sample [N, 1, ...]: xi, or the smallest radius whose perturbation survives the
    rounding of x + r to within 2^-11: |rounding error| <= ulp/2 per element, so its norm is
    at most finfo.eps / 2 * ||x||."""
    norm = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
    radius = torch.clamp(norm * (_ROUNDING_MARGIN * torch.finfo(x.dtype).eps), min=xi)
    return radius.reshape((-1,) + (1,) * (x.dim() - 1))


def _run_model(model: Model, x: Tensor) -> Tensor:
    """model(x) for vat_loss, which feeds float32 (float64) x with autocast off: a model whose
    parameters are of another dtype fails inside; say why, naming the fix."""
    try:
        return model(x)
    except RuntimeError as e:
        module = _module_of(model)
        other = None if module is None else next(
            (p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype != x.dtype), None)
        if other is None:
            raise
        raise TypeError(f"vat_loss runs the model on {x.dtype} inputs (its finite differences need them; autocast "
                        f"is off inside), but model has {other} parameters: pass a copy of the model in {x.dtype} "
                        f"(copy.deepcopy(model).to({x.dtype}))") from e


def _given_logits(logits, x: Tensor) -> None:
    """vat_loss's ``logits``: model(x), [N, C] floating on x's device."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        what = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"logits must be model(x), a floating-point tensor [N, C], got {what}")
    _validate.materialised("logits", logits)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"logits must be model(x), [N, C] with N = x.shape[0] = {x.shape[0]}, got shape "
                         f"{tuple(logits.shape)}")
    if logits.device != x.device:
        raise ValueError(f"logits is on {logits.device} but x is on {x.device}")


def vat_loss(model: Model, x: Tensor, xi: float = 1e-6, eps: float = 1.0, power_iterations: int = 1, *,
             clamp: Clamp = None, logits: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Virtual adversarial training loss (Miyato, Maeda, Koyama & Ishii, "Virtual Adversarial
    Training: A Regularization Method for Supervised and Semi-Supervised Learning", TPAMI
    2018), the local distributional smoothness

    .. math:: \mathrm{KL}\big(p(\cdot|x)\,\|\,p(\cdot|x + r_{adv})\big),\quad
              r_{adv} = \epsilon\, \frac{g}{\|g\|_2},\ g = \nabla_r \mathrm{KL}(p(\cdot|x) \| p(\cdot|x + r))|_{r = \xi d}

    found by ``power_iterations`` rounds of power iteration from a random unit direction d
    (per sample, L2 over all non-batch dims, so [N, F] features and [N, C, H, W] images both
    work). ``r_adv`` has L2 norm ``eps`` per sample, exactly. Needs no labels. Runs with
    autocast disabled and in float32 (float64 stays float64).

    The finite difference ``x + xi·d`` is taken at a radius that the rounding of ``x`` cannot
    swallow: ``xi``, raised per sample to ``2^10·finfo.eps·‖x‖`` where it is smaller (in
    float32 Miyato et al.'s xi = 1e-6 would leave most elements of an image unchanged and
    point r_adv nowhere near the power iteration's direction).

    Args:
        model: maps x to logits [N, C]; must accept float32 input. Any callable.
        x: inputs [N, ...], floating.
        xi: finite-difference radius of the power iteration (> 0), raised as above.
        eps: L2 norm of the adversarial perturbation (> 0).
        power_iterations: >= 1.
        clamp: ``None`` (VAT's own definition, any input), or ``(min, max)`` of the valid input
            range, numbers or tensors that broadcast to ``x`` (per channel for normalised
            images): ``x + r_adv`` is then clamped into the box, so its distance to ``x`` is
            at most eps, and ``x`` must lie in the box. The power iteration is not clamped.
        logits: ``model(x)`` if already computed (its prediction is the constant target);
            otherwise computed here without a graph.
        generator: for the random initial direction.

    Returns:
        A float32 scalar with a graph to the model's parameters (through the forward at
        x + r_adv only; the target p(·|x) is a constant).

    Raises:
        TypeError: non-floating ``x`` or ``logits``, a model (nn.Module) that fails on
        float32 (float64) inputs and has parameters of another dtype. ValueError: ``xi`` or ``eps`` <= 0,
        ``power_iterations`` < 1, ``x`` outside the clamp box, ``x`` a meta tensor, ``logits``
        of another shape than the model's output for ``x``.
    """
    check_input("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [N, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    for name, value in (("xi", xi), ("eps", eps)):
        if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 1:
        raise ValueError(f"power_iterations must be an integer >= 1, got {power_iterations!r}")
    if logits is not None:
        _given_logits(logits, x)
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    lo, hi = clamp_bounds(clamp, x)
    if lo is not None:
        _validate.no_bad_values((x < lo) | (x > hi), "vat_loss: x lies outside the clamp box, so clamping x + r_adv "
                                "would move it more than eps from x. If x is a normalised image ((image - mean) / "
                                "std), its box is ((0 - mean) / std, (1 - mean) / std) per channel: pass clamp=(lo, "
                                "hi) with tensors of shape [C, 1, 1], or clamp=None.")
    if x.shape[0] == 0:  # an empty batch has loss 0, as the fused losses' "mean" does
        module = _module_of(model)
        params = [] if module is None else list(module.parameters())
        return sum((p.sum() for p in params), x.new_zeros(())) * 0.0
    with torch.autocast(x.device.type, enabled=False), frozen_batchnorm_stats(model):
        with torch.no_grad():
            target = (_run_model(model, x) if logits is None else logits).detach()
        logp = torch.log_softmax(target.to(x.dtype), dim=-1)
        d = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        d = _unit_rows(d, d)
        radius = _probe_radius(x, xi)
        for _ in range(power_iterations):
            d.requires_grad_(True)
            with torch.enable_grad():
                probe = _run_model(model, x + radius * d)
                if probe.shape != target.shape:  # a logits= of another model or batch: say so, not a broadcast error
                    raise ValueError(f"logits has shape {tuple(target.shape)} but the model gives "
                                     f"{tuple(probe.shape)}: pass logits=model(x) for this x and model, or None")
                dist = _kl_batchmean(logp, torch.log_softmax(probe.to(x.dtype), dim=-1))
                (g,) = torch.autograd.grad(dist, d)
            d = _unit_rows(g, d.detach())
        x_adv = x + eps * d
        if lo is not None:
            x_adv = torch.clamp(x_adv, lo.to(x.dtype), hi.to(x.dtype))
        logq = torch.log_softmax(_run_model(model, x_adv).to(x.dtype), dim=-1)
        return _kl_batchmean(logp, logq)


_validate.splice_doc(fgsm, "CLAMP", _CLAMP_DOC)
_validate.splice_doc(pgd, "CLAMP", _CLAMP_DOC)
