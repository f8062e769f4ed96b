"""fgsm_perturb and pgd_step: the fused L-inf perturbation steps of FGSM and PGD.

They are no-grad steps: an attack computes the gradient of its loss with respect to the
input, then moves the input by it; nothing differentiates through the move. The custom ops
therefore register no autograd formula, and the public functions detach their inputs, so
the result never carries a graph.

eps, step_size and the clamp bounds are numbers or tensors that broadcast to the input, so a
per-sample budget ([N], or [N, 1, ...]) and the per-channel box of a normalised image
([C, 1, 1]) take no extra pass. Every step stays within eps of its input, or refuses: the
kernels check, where they read the data, that the input lies in the clamp box up to eps (a
normalised image clamped to [0, 1] does not) and that no finite input steps to inf in its
dtype (eps beyond float16's range).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate

# L-inf perturbation steps (csrc/adversarial.h) on tensors of one floating dtype. eps, step_size,
# clamp_min and clamp_max are each a 0-d CPU tensor (read on the host) or a tensor in x's opmath
# dtype on x's device that broadcasts to x: per sample [N, 1, ...], per channel [C, 1, 1] (the box
# of a normalised image), full shape, ...; the clamp bounds are both given or both None. The
# in-place forms overwrite their first argument. The kernels refuse (CPU: ValueError; CUDA: a
# device assertion) an input (fgsm: x, pgd: x_orig) farther than eps outside [clamp_min,
# clamp_max], and a finite input whose result is not finite in its dtype.
#   fgsm: clamp(x + eps * sign(grad))
#   pgd:  clamp(x_orig + clamp(x_adv + step_size * sign(grad) - x_orig, -eps, eps))
FGSM_SPEC = _backend.define(
    "fgsm_perturb(Tensor x, Tensor grad, Tensor eps, Tensor? clamp_min, Tensor? clamp_max) -> Tensor",
    triton="adversarial")
FGSM_INPLACE_SPEC = _backend.define(
    "fgsm_perturb_(Tensor(a!) x, Tensor grad, Tensor eps, Tensor? clamp_min, Tensor? clamp_max) -> ()",
    triton="adversarial")
PGD_SPEC = _backend.define(
    "pgd_step(Tensor x_adv, Tensor x_orig, Tensor grad, Tensor step_size, Tensor eps, Tensor? clamp_min, "
    "Tensor? clamp_max) -> Tensor",
    triton="adversarial")
PGD_INPLACE_SPEC = _backend.define(
    "pgd_step_(Tensor(a!) x_adv, Tensor x_orig, Tensor grad, Tensor step_size, Tensor eps, Tensor? clamp_min, "
    "Tensor? clamp_max) -> ()",
    triton="adversarial")

Scalar = Union[float, Tensor]
Clamp = Optional[tuple]

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


# --- argument checks (lepton_fast._validate) ------------------------------------------------------

check_input, operand = _validate.float_input, _validate.step_operand
clamp_bounds, opmath = _validate.clamp_bounds, _validate.opmath


def _sign_operand(grad: Tensor, x: Tensor) -> Tensor:
    # Only the sign of grad matters. Casting another dtype to x's could underflow a small
    # gradient to 0 (float32 -> float16), so such a grad is reduced to its sign first.
    grad = grad.detach()
    return grad if grad.dtype == x.dtype else grad.sign().to(x.dtype)


# --- the steps, on checked operands ------------------------------------------------------------

BOX_FIX = ("If the input is a normalised image ((image - mean) / std), its box is ((0 - mean) / std, (1 - mean) / std) "
           "per channel: pass clamp=(lo, hi) with tensors of shape [C, 1, 1], or clamp=None for inputs without bounds.")


def fgsm_checked(x: Tensor, g: Tensor, eps: Tensor, lo, hi, backend: Optional[str], *, in_place: bool) -> Tensor:
    """fgsm_perturb(_) on checked arguments (x detached, g in x's dtype, operands as made above)."""
    spec = FGSM_INPLACE_SPEC if in_place else FGSM_SPEC
    chosen = _backend.resolve(spec, x.device, backend)
    with torch.no_grad():
        if not in_place:
            return _backend.call(spec, chosen, x.device.type, x.contiguous(), g.contiguous(), eps, lo, hi)
        target = x if x.is_contiguous() else x.contiguous()
        _backend.call(spec, chosen, x.device.type, target, g.contiguous(), eps, lo, hi)
        return x if target is x else x.copy_(target)


def pgd_checked(x_adv: Tensor, x_orig: Tensor, g: Tensor, step: Tensor, eps: Tensor, lo, hi,
                     backend: Optional[str], *, in_place: bool) -> Tensor:
    """pgd_step(_) on checked arguments (x_orig in x_adv's dtype, g as fgsm_step takes it)."""
    spec = PGD_INPLACE_SPEC if in_place else PGD_SPEC
    chosen = _backend.resolve(spec, x_adv.device, backend)
    with torch.no_grad():
        args = (x_orig.contiguous(), g.contiguous(), step, eps, lo, hi)
        if not in_place:
            return _backend.call(spec, chosen, x_adv.device.type, x_adv.contiguous(), *args)
        target = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
        _backend.call(spec, chosen, x_adv.device.type, target, *args)
        return x_adv if target is x_adv else x_adv.copy_(target)


# --- public API --------------------------------------------------------------------------------

_CLAMP_DOC = """clamp: ``(min, max)`` bounds of the valid input range, each a number or a tensor
    that broadcasts to the input, or ``None`` for inputs without bounds (features,
    embeddings). The default suits images in [0, 1]. A normalised image
    ``(image - mean) / std`` has the per-channel box ``((0 - mean) / std, (1 - mean) / std)``:
    pass it as two [C, 1, 1] tensors on the input's device. The input must lie in the
    box up to eps (a ValueError otherwise, which names the fix), so that the step
    stays within eps of it."""


def _check_in_place(name: str, x: Tensor) -> None:
    """The in-place steps write under no_grad; refuse, as torch's own in-place ops do, a
    tensor that autograd is tracking, whose history the write would silently break."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad, so an in-place step would hide the write from autograd; pass a "
            f"detached copy ({name}.detach().clone()) or call it under torch.no_grad()"
        )


def _fgsm_args(x, grad, eps, clamp):
    check_input("x", x)
    _validate.floating_like("grad", grad, "x", x)
    lo, hi = clamp_bounds(clamp, x)
    return _sign_operand(grad, x), operand("eps", eps, x, non_negative=True), lo, hi


def fgsm_perturb(x: Tensor, grad: Tensor, eps: Scalar, clamp: Clamp = (0.0, 1.0), *,
                 backend: Optional[str] = None) -> Tensor:
    r"""The FGSM step :math:`\mathrm{clamp}(x + \epsilon\,\mathrm{sign}(\nabla), lo, hi)` in one pass
    (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015).

    Args:
        x: input of any shape [N, ...], float32, bfloat16, float16 or float64.
        grad: d(loss)/dx, same shape as ``x`` (any floating dtype). sign(0) = sign(NaN) = 0,
            so such an element is left unchanged, as ``torch.sign`` does.
        eps: step in input units >= 0: a number, a per-sample tensor [N], or any tensor that
            broadcasts to ``x`` (per channel [C, 1, 1], full shape).
        CLAMP
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A new tensor like ``x`` (contiguous), without a graph: the step is not
        differentiable. For float32 it is bit-equal to
        ``(x + eps * grad.sign()).clamp(lo, hi)``; lower precisions are computed in float32
        and rounded once.

    Raises:
        TypeError: non-tensor or non-floating ``x``/``grad``/``eps``, malformed ``clamp``.
        ValueError: shape or device mismatch; ``eps`` < 0 or not finite; clamp min > max; ``x``
            farther than eps outside the clamp box; a finite ``x`` that the step takes to inf
            in its dtype (``eps`` beyond float16's range, say). On the CPU at once; on a GPU
            the data checks are asynchronous device assertions (no host sync).
    """
    g, eps, lo, hi = _fgsm_args(x, grad, eps, clamp)
    return fgsm_checked(x.detach(), g, eps, lo, hi, backend, in_place=False)


def fgsm_perturb_(x: Tensor, grad: Tensor, eps: Scalar, clamp: Clamp = (0.0, 1.0), *,
                  backend: Optional[str] = None) -> Tensor:
    """In-place :func:`fgsm_perturb`: overwrites ``x`` and returns it. ``x`` must not need a
    gradient (an attack's adversarial copy, detached). A data error is raised after the
    write."""
    g, eps, lo, hi = _fgsm_args(x, grad, eps, clamp)
    _check_in_place("x", x)
    return fgsm_checked(x, g, eps, lo, hi, backend, in_place=True)


def _pgd_args(x_adv, x_orig, grad, step_size, eps, clamp):
    check_input("x_adv", x_adv)
    _validate.floating_like("x_orig", x_orig, "x_adv", x_adv)
    _validate.floating_like("grad", grad, "x_adv", x_adv)
    step = operand("step_size", step_size, x_adv, non_negative=True)
    eps = operand("eps", eps, x_adv, non_negative=True)
    lo, hi = clamp_bounds(clamp, x_adv)
    return x_orig.detach().to(x_adv.dtype), _sign_operand(grad, x_adv), step, eps, lo, hi


def pgd_step(x_adv: Tensor, x_orig: Tensor, grad: Tensor, step_size: Scalar, eps: Scalar,
             clamp: Clamp = (0.0, 1.0), *, backend: Optional[str] = None) -> Tensor:
    r"""One L-inf PGD step in one pass (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards
    Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018): a signed-gradient
    step, the projection onto the L-inf ball of radius eps around ``x_orig``, and the clamp:

    .. math:: x' = x_{adv} + \alpha\,\mathrm{sign}(\nabla),\quad
              \mathrm{clamp}(x_{orig} + \mathrm{clamp}(x' - x_{orig}, -\epsilon, \epsilon), lo, hi)

    Args:
        x_adv: current adversarial input [N, ...], float32, bfloat16, float16 or float64.
        x_orig: the clean input, same shape (cast to ``x_adv``'s dtype).
        grad: d(loss)/d(x_adv), same shape; sign(0) = sign(NaN) = 0.
        step_size: α >= 0: a number, a per-sample tensor [N], or a tensor that broadcasts.
        eps: radius >= 0 of the ball, as ``step_size``.
        CLAMP
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A new tensor like ``x_adv`` (contiguous), without a graph. For float32 it is
        bit-equal to the torchattacks composition ``x = x_adv + a * g.sign();
        d = (x - x_orig).clamp(-eps, eps); (x_orig + d).clamp(lo, hi)``; ‖result − x_orig‖∞
        ≤ eps up to the rounding of that last addition.

    Raises:
        TypeError: non-tensor or non-floating inputs, malformed ``clamp``.
        ValueError: shape or device mismatch; ``step_size`` or ``eps`` < 0 or not finite;
            clamp min > max; ``x_orig`` farther than eps outside the clamp box; a step that is
            not finite in the dtype. Data checks as :func:`fgsm_perturb`.
    """
    x_orig, g, step, eps, lo, hi = _pgd_args(x_adv, x_orig, grad, step_size, eps, clamp)
    return pgd_checked(x_adv.detach(), x_orig, g, step, eps, lo, hi, backend, in_place=False)


def pgd_step_(x_adv: Tensor, x_orig: Tensor, grad: Tensor, step_size: Scalar, eps: Scalar,
              clamp: Clamp = (0.0, 1.0), *, backend: Optional[str] = None) -> Tensor:
    """In-place :func:`pgd_step`: overwrites ``x_adv`` and returns it. A data error is raised
    after the write."""
    x_orig, g, step, eps, lo, hi = _pgd_args(x_adv, x_orig, grad, step_size, eps, clamp)
    _check_in_place("x_adv", x_adv)
    return pgd_checked(x_adv, x_orig, g, step, eps, lo, hi, backend, in_place=True)


_validate.splice_doc(fgsm_perturb, "CLAMP", _CLAMP_DOC)
_validate.splice_doc(pgd_step, "CLAMP", _CLAMP_DOC)
