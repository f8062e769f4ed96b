"""fgsm_perturb and pgd_step: the fused L-inf perturbation steps of FGSM and PGD.

They are no-grad steps: an attack computes the gradient of its loss with respect to the
input, then moves the input by it; nothing differentiates through the move. The custom ops
therefore register no autograd formula, and the public functions detach their inputs, so
the result never carries a graph.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate, reference

FGSM_SPEC = _backend.register("fgsm_perturb", triton="adversarial")
FGSM_INPLACE_SPEC = _backend.register("fgsm_perturb_", triton="adversarial")
PGD_SPEC = _backend.register("pgd_step", triton="adversarial")
PGD_INPLACE_SPEC = _backend.register("pgd_step_", triton="adversarial")

Scalar = Union[float, Tensor]

if _backend.extension().module is not None:

    @torch.library.register_fake("lepton_fast::fgsm_perturb")
    def _(x, grad, eps, clamp_min, clamp_max):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lepton_fast::fgsm_perturb_")
    def _(x, grad, eps, clamp_min, clamp_max):
        return None

    @torch.library.register_fake("lepton_fast::pgd_step")
    def _(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
        return torch.empty_like(x_adv, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lepton_fast::pgd_step_")
    def _(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
        return None


# --- argument checks ---------------------------------------------------------------------------

def _check_input(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return x


def _check_like(name: str, t, ref_name: str, ref: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _validate.same_shape(name, t, ref_name, ref)
    return t


def _check_size(name: str, value, x: Tensor) -> Tensor:
    """A number >= 0 (a 0-d float64 CPU tensor for the kernels), or a per-sample [N] (or 0-d)
    tensor >= 0 in x's opmath dtype on x's device.

    The sign check of a tensor reads it: eagerly on CPU, with torch._assert_async elsewhere,
    so that nothing synchronises with the host.
    """
    if isinstance(value, Tensor) and (value.dim() > 0 or value.device != torch.device("cpu")):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {value.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{name} as a tensor needs a batch dimension in the input, got a 0-d input")
        if value.dim() == 0:
            value = value.expand(x.shape[0])
        if value.shape != (x.shape[0],):
            raise ValueError(f"{name} must be a float or a per-sample tensor of shape [{x.shape[0]}], "
                             f"got shape {tuple(value.shape)}")
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but the input is on {x.device}")
        value = value.detach().to(torch.promote_types(x.dtype, torch.float32)).contiguous()
        bad = ~(torch.isfinite(value) & (value >= 0))
        _validate.no_bad_values(bad, f"{name} must be finite and >= 0 for every sample", value)
        return value
    return _validate.non_negative(name, value)


def _check_clamp(clamp):
    if clamp is None:
        return None, None
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise TypeError(f"clamp must be None or a pair (min, max) of numbers, got {clamp!r}") from None
    lo, hi = _validate.hyper("clamp[0]", lo), _validate.hyper("clamp[1]", hi)
    if not torch.compiler.is_compiling() and float(lo) > float(hi):
        raise ValueError(f"clamp must be (min, max) with min <= max, got {clamp!r}")
    return lo, hi


def _sign_operand(grad: Tensor, x: Tensor) -> Tensor:
    # Only the sign of grad matters. Casting another dtype to x's could underflow a small
    # gradient to 0 (float32 -> float16), so such a grad is reduced to its sign first.
    grad = grad.detach()
    return grad if grad.dtype == x.dtype else grad.sign().to(x.dtype)


# --- public API --------------------------------------------------------------------------------

def _fgsm_args(x, grad, eps, clamp):
    _check_input("x", x)
    _check_like("grad", grad, "x", x)
    eps = _check_size("eps", eps, x)
    lo, hi = _check_clamp(clamp)
    return _sign_operand(grad, x), eps, lo, hi


def _reference_bounds(lo, hi):
    return None if lo is None else (lo, hi)


def fgsm_perturb(x: Tensor, grad: Tensor, eps: Scalar, clamp=(0.0, 1.0), *,
                 backend: Optional[str] = None) -> Tensor:
    r"""The FGSM step :math:`\mathrm{clamp}(x + \epsilon\,\mathrm{sign}(\nabla), lo, hi)` in one pass
    (Goodfellow, Shlens & Szegedy 2015).

    Args:
        x: input of any shape [N, ...], float32, bfloat16, float16 or float64 (images in
            [0, 1] with the default ``clamp``).
        grad: d(loss)/dx, same shape as ``x`` (any floating dtype). sign(0) = sign(NaN) = 0,
            so such an element is left unchanged, as ``torch.sign`` does.
        eps: step in input units, a float >= 0 or a per-sample tensor [N] (broadcast over the
            non-batch dims).
        clamp: ``(min, max)`` bounds of the valid input range, or ``None`` for inputs that
            are not bounded (features, embeddings).
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A new tensor like ``x`` (contiguous), without a graph: the step is not
        differentiable. For float32 it is bit-equal to
        ``(x + eps * grad.sign()).clamp(lo, hi)``; lower precisions are computed in float32
        and rounded once.

    Raises:
        TypeError: non-tensor or non-floating ``x``/``grad``/``eps``, malformed ``clamp``.
        ValueError: shape or device mismatch, ``eps`` < 0 or not finite, clamp min > max.
    """
    g, eps, lo, hi = _fgsm_args(x, grad, eps, clamp)
    chosen = _backend.resolve(FGSM_SPEC, x.device, backend)
    x = x.detach()
    if chosen == "reference":
        with torch.no_grad():
            return reference.fgsm_perturb(x, g, eps, _reference_bounds(lo, hi))
    return _backend.call(FGSM_SPEC, chosen, x.device.type, x.contiguous(), g.contiguous(), eps, lo, hi)


def _check_in_place(name: str, x: Tensor) -> None:
    """The in-place steps write under no_grad; refuse, as torch's own in-place ops do, a
    tensor that autograd is tracking, whose history the write would silently break."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad, so an in-place step would hide the write from autograd; pass a "
            f"detached copy ({name}.detach().clone()) or call it under torch.no_grad()"
        )


def fgsm_perturb_(x: Tensor, grad: Tensor, eps: Scalar, clamp=(0.0, 1.0), *,
                  backend: Optional[str] = None) -> Tensor:
    """In-place :func:`fgsm_perturb`: overwrites ``x`` and returns it. ``x`` must not need a
    gradient (an attack's adversarial copy, detached)."""
    g, eps, lo, hi = _fgsm_args(x, grad, eps, clamp)
    _check_in_place("x", x)
    chosen = _backend.resolve(FGSM_INPLACE_SPEC, x.device, backend)
    with torch.no_grad():
        if chosen == "reference":
            x.copy_(reference.fgsm_perturb(x, g, eps, _reference_bounds(lo, hi)))
        else:
            target = x if x.is_contiguous() else x.contiguous()
            _backend.call(FGSM_INPLACE_SPEC, chosen, x.device.type, target, g.contiguous(), eps, lo, hi)
            if target is not x:
                x.copy_(target)
    return x


def _pgd_args(x_adv, x_orig, grad, step_size, eps, clamp):
    _check_input("x_adv", x_adv)
    _check_like("x_orig", x_orig, "x_adv", x_adv)
    _check_like("grad", grad, "x_adv", x_adv)
    step = _check_size("step_size", step_size, x_adv)
    eps = _check_size("eps", eps, x_adv)
    lo, hi = _check_clamp(clamp)
    x_orig = x_orig.detach().to(x_adv.dtype)
    return x_orig, _sign_operand(grad, x_adv), step, eps, lo, hi


def pgd_step(x_adv: Tensor, x_orig: Tensor, grad: Tensor, step_size: Scalar, eps: Scalar,
             clamp=(0.0, 1.0), *, backend: Optional[str] = None) -> Tensor:
    r"""One L-inf PGD step in one pass (Madry et al. 2018): a signed-gradient step, the
    projection onto the L-inf ball of radius eps around ``x_orig``, and the clamp:

    .. math:: x' = x_{adv} + \alpha\,\mathrm{sign}(\nabla),\quad
              \mathrm{clamp}(x_{orig} + \mathrm{clamp}(x' - x_{orig}, -\epsilon, \epsilon), lo, hi)

    Args:
        x_adv: current adversarial input [N, ...], float32, bfloat16, float16 or float64.
        x_orig: the clean input, same shape (cast to ``x_adv``'s dtype).
        grad: d(loss)/d(x_adv), same shape; sign(0) = sign(NaN) = 0.
        step_size: α >= 0, a float or a per-sample tensor [N].
        eps: radius >= 0 of the ball, a float or a per-sample tensor [N].
        clamp: ``(min, max)`` of the valid input range, or ``None``.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A new tensor like ``x_adv`` (contiguous), without a graph. For float32 it is
        bit-equal to the torchattacks composition ``x = x_adv + a * g.sign();
        d = (x - x_orig).clamp(-eps, eps); (x_orig + d).clamp(lo, hi)``; ‖result − x_orig‖∞
        ≤ eps up to the rounding of that last addition.

    Raises:
        TypeError: non-tensor or non-floating inputs, malformed ``clamp``.
        ValueError: shape or device mismatch, ``step_size`` or ``eps`` < 0 or not finite,
            clamp min > max.
    """
    x_orig, g, step, eps, lo, hi = _pgd_args(x_adv, x_orig, grad, step_size, eps, clamp)
    chosen = _backend.resolve(PGD_SPEC, x_adv.device, backend)
    x_adv = x_adv.detach()
    if chosen == "reference":
        with torch.no_grad():
            return reference.pgd_step(x_adv, x_orig, g, step, eps, _reference_bounds(lo, hi))
    return _backend.call(PGD_SPEC, chosen, x_adv.device.type, x_adv.contiguous(), x_orig.contiguous(), g.contiguous(),
                         step, eps, lo, hi)


def pgd_step_(x_adv: Tensor, x_orig: Tensor, grad: Tensor, step_size: Scalar, eps: Scalar,
              clamp=(0.0, 1.0), *, backend: Optional[str] = None) -> Tensor:
    """In-place :func:`pgd_step`: overwrites ``x_adv`` and returns it."""
    x_orig, g, step, eps, lo, hi = _pgd_args(x_adv, x_orig, grad, step_size, eps, clamp)
    _check_in_place("x_adv", x_adv)
    chosen = _backend.resolve(PGD_INPLACE_SPEC, x_adv.device, backend)
    with torch.no_grad():
        if chosen == "reference":
            x_adv.copy_(reference.pgd_step(x_adv, x_orig, g, step, eps, _reference_bounds(lo, hi)))
        else:
            target = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
            _backend.call(PGD_INPLACE_SPEC, chosen, x_adv.device.type, target, x_orig.contiguous(), g.contiguous(),
                          step, eps, lo, hi)
            if target is not x_adv:
                x_adv.copy_(target)
    return x_adv
