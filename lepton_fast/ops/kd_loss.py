"""fused_kd_loss: knowledge distillation with the gradient written during the forward.

Path of a call: :func:`fused_kd_loss` checks the arguments (lepton_fast._validate) and calls
``torch.ops.lepton_fast.fused_kd_loss`` (schema: csrc/ops.cpp); the dispatcher runs the C++
autograd kernel (csrc/autograd.cpp), then the device kernel (csrc/cpu/kd_loss.cpp,
csrc/cuda/kd_loss.cu, or kernels/kd_loss.py). ``backend="reference"`` runs reference.py.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate, reference

SPEC = _backend.register("fused_kd_loss", triton="kd_loss")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

Scalar = Union[float, Tensor]

if _backend.extension().module is not None:

    @torch.library.register_fake("lepton_fast::fused_kd_loss")
    def _(student_logits, teacher_logits, labels, temperature, beta, alpha, label_smoothing, divergence,
          ignore_index, scale_by_t2, reduction, num_items_in_batch, compute_grad):
        acc = torch.promote_types(student_logits.dtype, torch.float32)
        loss = student_logits.new_empty((student_logits.shape[0],) if reduction == "none" else (), dtype=acc)
        grad = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty((0,))
        return loss, grad


def _num_items(value, like: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, Tensor) and value.device == like.device and like.device.type != "cpu":
        # transformers hands the count over on the device; the kernel reads it there.
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(torch.float64)
    return _validate.positive("num_items_in_batch", value)


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: Scalar = 1.0,
    *,
    divergence: str = "forward_kl",
    beta: Scalar = 0.5,
    labels: Optional[Tensor] = None,
    alpha: Scalar = 0.0,
    label_smoothing: Scalar = 0.0,
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
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
        teacher_logits: [..., C], same shape; a constant (detached). Of another dtype, both
            are read in the wider of the two (never rounded to the narrower), and the
            gradient comes back in the student's dtype.
        temperature: T > 0, softens both distributions. A float or a 0-d CPU tensor (as
            are beta, alpha and label_smoothing): a value that changes every step does not
            recompile a ``torch.compile`` graph.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1]; used only by ``"jsd"``.
        labels: optional [...] integer hard labels (int64 or int32). Rows labelled
            ``ignore_index`` are left out of the loss and get zero gradient, also when
            ``alpha`` is 0.
        alpha: weight in [0, 1] of the hard-label CE; > 0 needs ``labels``.
        label_smoothing: in [0, 1], for the CE term (as ``F.cross_entropy``).
        ignore_index: label value that marks a row to leave out (default -100).
        scale_by_t2: multiply the soft term by T² (Hinton et al.; PyTorch's KD tutorial,
            torchdistill). Pass False for TRL/Liger-Kernel's unscaled loss.
        reduction: ``"mean"`` (= ``"batchmean"``): mean over non-ignored rows of the per-row
            loss, 0 if every row is ignored; ``"sum"``; ``"none"``: per-row loss [...], 0 at
            ignored rows. Unlike ``F.kl_div(reduction="mean")``, "mean" is per sample.
        num_items_in_batch: the sum of the row losses divided by this count instead (> 0, a
            number or a 0-d tensor), as transformers and TRL do under gradient accumulation;
            not with ``reduction="none"``.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (default: the
            compiled kernel, or ``$LEPTON_FAST_BACKEND``).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for ``"none"``.
        The gradient comes back in the student's dtype.

    Raises:
        TypeError: non-tensor or non-floating logits, non-integer labels, a hyper-parameter
            that is not a number.
        ValueError: shapes that differ, temperature ≤ 0 or not finite, beta/alpha/
            label_smoothing outside [0, 1], unknown divergence or reduction, labels out
            of range, alpha > 0 without labels, a row that is entirely -inf.
        RuntimeError: a forced backend that cannot run here (the message says why); a
            second backward through the same graph, or a second-order gradient
            (``create_graph=True``), which only ``backend="reference"`` gives.

    Precision: the soft term is a KL of O(1/T²) multiplied back by T², so float32
    accumulation loses digits as T grows (relative error about 1e-6 at T = 30, 1e-4 at
    T = 100, a few % at T = 1000, measured; the gradient stays accurate). For T ≫ 100 pass
    float64 logits, which the kernels accumulate in float64.

    The gradient is computed during the forward into one buffer the size of the logits;
    nothing else larger than O(N) is allocated. The backward scales it in place.
    """
    _validate.logits("student_logits", student_logits)
    _validate.logits("teacher_logits", teacher_logits)
    _validate.same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    temperature_t = _validate.positive("temperature", temperature)
    _validate.choice("divergence", divergence, DIVERGENCES)
    beta_t = _validate.unit_interval("beta", beta)
    alpha_t = _validate.unit_interval("alpha", alpha)
    label_smoothing_t = _validate.unit_interval("label_smoothing", label_smoothing)
    _validate.choice("reduction", reduction, _validate.REDUCTIONS)
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("num_items_in_batch divides the summed loss, so it needs reduction 'mean' or 'sum', not 'none'")
    num_items = _num_items(num_items_in_batch, student_logits)
    if labels is not None:
        labels = _validate.class_labels("labels", labels, "student_logits", student_logits).reshape(-1)
    else:
        _validate.zero("alpha", alpha, "alpha > 0 weights a hard-label cross-entropy, so labels are required")

    lead = student_logits.shape[:-1]
    student, teacher = _validate.common_dtype(student_logits, teacher_logits.detach())
    student, teacher = _validate.as_rows(student), _validate.as_rows(teacher)
    chosen = _backend.resolve(SPEC, student.device, backend)
    if chosen == "reference":
        if labels is not None:
            _validate.labels_in_range("labels", labels, student.shape[-1], ignore_index)
        loss = reference.fused_kd_loss(
            student, teacher, temperature, divergence=divergence, beta=beta, labels=labels, alpha=alpha,
            label_smoothing=label_smoothing, ignore_index=ignore_index, scale_by_t2=scale_by_t2, reduction=reduction,
            num_items_in_batch=num_items_in_batch,
        )
        # Every term is >= 0 (or +inf), so a NaN row leaves NaN in a sum as well.
        _validate.rows_defined(loss.reshape(-1), "fused_kd_loss: student_logits or teacher_logits")
    else:
        compute_grad = student.requires_grad and torch.is_grad_enabled()
        loss, _ = _backend.call(
            SPEC, chosen, student.device.type, student, teacher, labels, temperature_t, beta_t, alpha_t,
            label_smoothing_t, divergence, ignore_index, scale_by_t2, reduction, num_items, compute_grad,
        )
    return loss.reshape(lead) if reduction == "none" else loss
