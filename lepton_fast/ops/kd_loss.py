"""fused_kd_loss: knowledge distillation loss with the gradient written during the forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lepton_fast import _backend, _validate, reference
from lepton_fast.ops._grad import backward_scaled

SPEC = _backend.register("fused_kd_loss", kernel="kd_loss_forward", triton="kd_loss")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _forward_kernel(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.lepton_fast.kd_loss_forward
    return _backend.triton_kernels(SPEC).kd_loss_forward


@torch.library.custom_op("lepton_fast::kd_loss", mutates_args=())
def kd_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    divergence: str,
    beta: float,
    alpha: float,
    label_smoothing: float,
    ignore_index: int,
    scale_by_t2: bool,
    reduction: str,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """[N, C] logits -> (loss as ``reduction`` asks, d(loss)/d(student) or an empty tensor).

    The kernel writes each row's loss and gradient; the gradient already carries the 1/N
    of a mean, so the backward multiplies by grad_output alone.
    """
    divisor = reference.mean_divisor(labels, ignore_index, student.shape[0])
    grad_scale = torch.ones((), dtype=torch.float32, device=student.device)
    if reduction in ("mean", "batchmean"):
        grad_scale = grad_scale / divisor
    rows, grad = _forward_kernel(backend)(
        student, teacher, labels, grad_scale, temperature, divergence, beta, alpha,
        label_smoothing, ignore_index, scale_by_t2, compute_grad,
    )
    _validate.rows_defined(rows, "fused_kd_loss: student_logits or teacher_logits")
    return reference.reduce_rows(rows, reduction, divisor), grad


@kd_loss.register_fake
def _(student, teacher, labels, temperature, divergence, beta, alpha, label_smoothing,
      ignore_index, scale_by_t2, reduction, compute_grad, backend):
    loss_dtype = torch.promote_types(student.dtype, torch.float32)
    loss_shape = (student.shape[0],) if reduction == "none" else ()
    loss = student.new_empty(loss_shape, dtype=loss_dtype)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    # Otherwise autograd fills an [N, C] zero tensor for the unused gradient of output[1]:
    # one more buffer the size of the logits and one more pass over it in every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _unused):
    (grad,) = ctx.saved_tensors
    return (backward_scaled(grad, grad_loss, ctx.backend),) + (None,) * 12


kd_loss.register_autograd(_backward, setup_context=_setup_context)


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    labels: Optional[Tensor] = None,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Knowledge-distillation loss in one fused pass (Hinton, Vinyals & Dean 2015).

    With :math:`p_s = \mathrm{softmax}(s / T)` and :math:`p_t = \mathrm{softmax}(t / T)`, each
    row's loss is

    .. math:: \alpha\,\mathrm{CE}(s, y) + (1 - \alpha)\, T^2\, D(p_t, p_s)

    where D is ``divergence``: ``"forward_kl"`` KL(p_t ‖ p_s) (Hinton KD), ``"reverse_kl"``
    KL(p_s ‖ p_t), or ``"jsd"``, the generalized Jensen-Shannon divergence
    β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m) with m = β·p_t + (1−β)·p_s (Agarwal et al. 2024, as in
    TRL: β = 0 is forward KL, β = 1 reverse KL). CE is at T = 1 with ``label_smoothing``.

    Args:
        student_logits: [..., C] float32, bfloat16, float16 or float64. Gradient flows here.
            May hold -inf (masked classes); a row that is entirely -inf is an error.
        teacher_logits: [..., C], same shape; a constant (detached). Cast to the student's
            dtype if it differs.
        temperature: T > 0, softens both distributions.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1]; used only by ``"jsd"``.
        labels: optional [...] int64 hard labels. Rows labelled ``ignore_index`` are left out
            of the loss and get zero gradient, also when ``alpha`` is 0.
        alpha: weight in [0, 1] of the hard-label CE; > 0 needs ``labels``.
        label_smoothing: in [0, 1], for the CE term (as ``F.cross_entropy``).
        ignore_index: label value that marks a row to leave out (default -100).
        scale_by_t2: multiply the soft term by T² (Hinton et al.; PyTorch's KD tutorial,
            torchdistill). Pass False for TRL/Liger-Kernel's unscaled loss.
        reduction: ``"mean"`` (= ``"batchmean"``): mean over non-ignored rows of the per-row
            loss, 0 if every row is ignored; ``"sum"``; ``"none"``: per-row loss [...], 0 at
            ignored rows. Unlike ``F.kl_div(reduction="mean")``, "mean" is per sample.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (default: the
            fastest available, or ``$LEPTON_FAST_BACKEND``).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for ``"none"``.
        The gradient comes back in the student's dtype.

    Raises:
        TypeError: non-tensor or non-floating logits, non-integer labels.
        ValueError: shapes that differ, temperature ≤ 0 or not finite, beta/alpha/
            label_smoothing outside [0, 1], unknown divergence or reduction, labels out
            of range, alpha > 0 without labels, a row that is entirely -inf.
        RuntimeError: a forced backend that cannot run here (the message says why).

    Precision: the soft term is a KL of O(1/T²) multiplied back by T², so float32
    accumulation loses digits as T grows (relative error about 1e-6 at T = 30, 1e-4 at
    T = 100, a few % at T = 1000, measured; the gradient stays accurate). For T ≫ 100 pass
    float64 logits, which the kernels accumulate in float64.

    The gradient is computed during the forward into one buffer the size of the logits;
    nothing else larger than O(N) is allocated. The backward scales it in place, so a
    second backward through the same graph raises instead of double-scaling.
    """
    _validate.logits("student_logits", student_logits)
    _validate.logits("teacher_logits", teacher_logits)
    _validate.same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    temperature = _validate.positive_finite("temperature", temperature)
    _validate.choice("divergence", divergence, DIVERGENCES)
    beta = _validate.in_unit_interval("beta", beta)
    alpha = _validate.in_unit_interval("alpha", alpha)
    label_smoothing = _validate.in_unit_interval("label_smoothing", label_smoothing)
    _validate.choice("reduction", reduction, _validate.REDUCTIONS)
    if labels is not None:
        labels = _validate.class_labels("labels", labels, "student_logits", student_logits, ignore_index)
        labels = labels.reshape(-1)
    elif alpha > 0:
        raise ValueError(f"alpha={alpha} weights a hard-label cross-entropy, so labels are required")

    lead = student_logits.shape[:-1]
    student = _validate.as_rows(student_logits)
    teacher = _validate.as_rows(teacher_logits.detach().to(student.dtype))
    chosen = _backend.resolve(SPEC, student.device, backend)
    if chosen == "reference":
        loss = reference.fused_kd_loss(
            student, teacher, temperature, divergence=divergence, beta=beta, labels=labels,
            alpha=alpha, label_smoothing=label_smoothing, ignore_index=ignore_index,
            scale_by_t2=scale_by_t2, reduction=reduction,
        )
        # Every term is >= 0, so a NaN row leaves NaN in the sum as well.
        _validate.rows_defined(loss, "fused_kd_loss: student_logits or teacher_logits")
    else:
        compute_grad = student.requires_grad and torch.is_grad_enabled()
        loss, _ = kd_loss(
            student, teacher, labels, temperature, divergence, beta, alpha, label_smoothing,
            ignore_index, scale_by_t2, reduction, compute_grad, chosen,
        )
    return loss.reshape(lead) if reduction == "none" else loss
