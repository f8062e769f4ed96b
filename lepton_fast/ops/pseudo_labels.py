"""Confidence-thresholded pseudo-labels: selection, and FixMatch's unlabeled loss in one pass."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lepton_fast import _backend, _validate, reference
from lepton_fast.ops._grad import backward_scaled

SELECT_SPEC = _backend.register("select_pseudo_labels", kernel="select_pseudo_labels", triton="pseudo_labels")
LOSS_SPEC = _backend.register("fused_pseudo_label_loss", kernel="pseudo_label_loss_forward", triton="pseudo_labels")
REDUCTIONS = ("mean", "sum", "none")


class PseudoLabels(NamedTuple):
    """What :func:`select_pseudo_labels` returns; shapes are the logits' leading dims [...]."""

    labels: Tensor  # int64: arg-max class, ties to the lowest index
    confidence: Tensor  # float32 (float64 for float64 logits): max softmax(logits / T)
    mask: Tensor  # bool: confidence >= threshold (or class_thresholds[label])


class PseudoLabelLoss(NamedTuple):
    """What :func:`fused_pseudo_label_loss` returns.

    ``loss`` is the differentiable part (call ``.backward()`` on it); the rest are
    constants describing the weak view, ready for a threshold's ``update``.
    """

    loss: Tensor  # float32 scalar, or [...] for reduction="none"
    labels: Tensor  # int64 [...]: the weak view's pseudo-labels
    confidence: Tensor  # float32 [...]: max softmax(weak / T)
    mask: Tensor  # bool [...]: confidence >= threshold (or class_thresholds[label])
    class_counts: Tensor  # int64 [C]: selected rows per pseudo-label (sum == mask.sum())


def _class_thresholds(value, logits_name: str, x: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    name = "class_thresholds"
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [C] or None, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.shape != (x.shape[-1],):
        raise ValueError(
            f"{name} must have shape [C] = ({x.shape[-1]},) to match {logits_name} {tuple(x.shape)}, "
            f"got {tuple(value.shape)}"
        )
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but {logits_name} is on {x.device}")
    value = value.detach()
    _validate.no_bad_values(~((value >= 0) & (value <= 1)), f"{name} must be in [0, 1]", value)
    return value.to(torch.float32).contiguous()


def _weights(value, logits_name: str, x: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    name = "weights"
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [...] or None, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.shape != x.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(x.shape[:-1])} (one per row of {logits_name} "
            f"{tuple(x.shape)}), got {tuple(value.shape)}"
        )
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but {logits_name} is on {x.device}")
    value = value.detach()
    _validate.no_bad_values(~((value >= 0) & torch.isfinite(value)), f"{name} must be finite and >= 0", value)
    return value.reshape(-1).to(torch.promote_types(x.dtype, torch.float32)).contiguous()


def _kernel(spec, backend: str, name: str):
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.lepton_fast, name)
    return getattr(_backend.triton_kernels(spec), name)


# --- select_pseudo_labels ------------------------------------------------------------------


@torch.library.custom_op("lepton_fast::pseudo_labels", mutates_args=())
def select_op(
    logits: Tensor, class_thresholds: Optional[Tensor], threshold: float, temperature: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """[N, C] logits -> (labels int64 [N], confidence [N], mask bool [N])."""
    labels, confidence, mask = _kernel(SELECT_SPEC, backend, "select_pseudo_labels")(
        logits, class_thresholds, threshold, temperature
    )
    _validate.rows_defined(confidence, "select_pseudo_labels: logits")
    return labels, confidence, mask


@select_op.register_fake
def _(logits, class_thresholds, threshold, temperature, backend):
    n = logits.shape[0]
    conf_dtype = torch.promote_types(logits.dtype, torch.float32)
    return (
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((n,), dtype=conf_dtype),
        logits.new_empty((n,), dtype=torch.bool),
    )


def select_pseudo_labels(
    logits: Tensor,
    threshold: float = 0.95,
    temperature: float = 1.0,
    class_thresholds: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> PseudoLabels:
    """Pseudo-labels of a batch, in one read of the logits (FixMatch, Sohn et al. 2020).

    ``labels`` = argmax of the logits (ties resolve to the lowest class index, as
    ``torch.argmax``); ``confidence`` = max softmax(logits / T); ``mask`` = confidence ≥
    ``threshold`` (≥, as FixMatch and USB), or ≥ ``class_thresholds[label]`` when given
    (FlexMatch, FreeMatch; see :mod:`lepton_fast.thresholds`). No gradient.

    Args:
        logits: [..., C] float32, bfloat16, float16 or float64; non-contiguous is fine.
        threshold: in [0, 1]; ignored when ``class_thresholds`` is given.
        temperature: T > 0 (T < 1 sharpens, so raises the confidence).
        class_thresholds: optional [C] floating tensor of per-class thresholds in [0, 1].
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`PseudoLabels` ``(labels int64 [...], confidence float32 [...] (float64 for
        float64 logits), mask bool [...])``.

    Raises:
        TypeError: non-tensor or non-floating logits or class_thresholds.
        ValueError: threshold or class_thresholds outside [0, 1], temperature ≤ 0,
            class_thresholds not of shape [C], a row that is entirely -inf or holds NaN.
        RuntimeError: a forced backend that cannot run here (the message says why).
    """
    _validate.logits("logits", logits)
    threshold = _validate.in_unit_interval("threshold", threshold)
    temperature = _validate.positive_finite("temperature", temperature)
    class_thresholds = _class_thresholds(class_thresholds, "logits", logits)
    lead = logits.shape[:-1]
    x = _validate.as_rows(logits.detach())
    chosen = _backend.resolve(SELECT_SPEC, x.device, backend)
    if chosen == "reference":
        labels, confidence, mask = reference.select_pseudo_labels(x, threshold, temperature, class_thresholds)
        _validate.rows_defined(confidence, "select_pseudo_labels: logits")
    else:
        labels, confidence, mask = select_op(x, class_thresholds, threshold, temperature, chosen)
    return PseudoLabels(labels.reshape(lead), confidence.reshape(lead), mask.reshape(lead))


# --- fused_pseudo_label_loss ---------------------------------------------------------------


@torch.library.custom_op("lepton_fast::pseudo_label_loss", mutates_args=())
def loss_op(
    strong: Tensor,
    weak: Tensor,
    class_thresholds: Optional[Tensor],
    weights: Optional[Tensor],
    threshold: float,
    temperature: float,
    soft: bool,
    reduction: str,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[N, C] views -> (loss, d(loss)/d(strong) or an empty tensor, labels, confidence, mask).

    The kernel's gradient already carries the 1/N of a mean, so the backward multiplies
    by grad_output alone.
    """
    n_rows = strong.shape[0]
    grad_scale = 1.0 / max(n_rows, 1) if reduction == "mean" else 1.0
    rows, grad, labels, confidence, mask = _kernel(LOSS_SPEC, backend, "pseudo_label_loss_forward")(
        strong, weak, class_thresholds, weights, threshold, temperature, soft, grad_scale, compute_grad
    )
    _validate.rows_defined(confidence, "fused_pseudo_label_loss: weak_logits")
    _validate.rows_defined(rows, "fused_pseudo_label_loss: strong_logits")
    return reference.reduce_rows(rows, reduction, max(n_rows, 1)), grad, labels, confidence, mask


@loss_op.register_fake
def _(strong, weak, class_thresholds, weights, threshold, temperature, soft, reduction, compute_grad, backend):
    n = strong.shape[0]
    acc = torch.promote_types(strong.dtype, torch.float32)
    return (
        strong.new_empty((n,) if reduction == "none" else (), dtype=acc),
        torch.empty_like(strong) if compute_grad else strong.new_empty((0,)),
        strong.new_empty((n,), dtype=torch.int64),
        strong.new_empty((n,), dtype=acc),
        strong.new_empty((n,), dtype=torch.bool),
    )


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(*output[1:])
    # Otherwise autograd fills a zero "gradient" for each unused output, the [N, C] buffer
    # included: a write of N x C elements that doubled the backward's time.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    (grad,) = ctx.saved_tensors
    return (backward_scaled(grad, grad_loss, ctx.backend),) + (None,) * 9


loss_op.register_autograd(_backward, setup_context=_setup_context)


def fused_pseudo_label_loss(
    strong_logits: Tensor,
    weak_logits: Tensor,
    threshold: float = 0.95,
    temperature: float = 1.0,
    soft: bool = False,
    class_thresholds: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
) -> PseudoLabelLoss:
    r"""FixMatch's unlabeled loss in one pass over both views (Sohn et al. 2020).

    From the weak view (no gradient): pseudo-label :math:`\hat y = \arg\max w`,
    confidence :math:`c = \max \mathrm{softmax}(w / T)`, mask :math:`m = [c \ge \tau]`
    (τ = ``threshold``, or ``class_thresholds[ŷ]``). Each row's loss is

    .. math:: \ell = m \cdot \mathrm{CE}(s, \hat y)
              \quad\text{or, with soft=True,}\quad
              m \cdot \Bigl(-\sum_j \mathrm{softmax}(w / T)_j \log \mathrm{softmax}(s)_j\Bigr)

    on the strong view s at T = 1 (T only sharpens the weak view, as in USB). ``weights``
    replaces m by a per-row weight (SoftMatch's truncated Gaussian); the mask is still
    computed and returned. "mean" averages over ALL rows, selected or not, as FixMatch
    defines it, so a batch with no row selected has loss 0 and gradient 0.

    Args:
        strong_logits: [..., C] float32, bfloat16, float16 or float64. Gradient flows here.
        weak_logits: [..., C], same shape; a constant (detached), cast to the strong dtype.
        threshold: τ in [0, 1]; ignored when ``class_thresholds`` is given.
        temperature: T > 0 for the weak view's confidence and soft target.
        soft: use softmax(weak / T) as the target instead of the hard pseudo-label.
        class_thresholds: optional [C] tensor of per-class thresholds in [0, 1]
            (FlexMatch, FreeMatch).
        weights: optional [...] per-row weights, finite and ≥ 0, used instead of the mask.
        reduction: ``"mean"`` (sum / number of rows), ``"sum"``, or ``"none"`` ([...]).
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`PseudoLabelLoss` ``(loss, labels, confidence, mask, class_counts)``: ``loss``
        float32 (float64 for float64 inputs), a scalar or [...] for "none"; ``labels``
        int64 [...], ``confidence`` float32 [...], ``mask`` bool [...] of the weak view;
        ``class_counts`` int64 [C], selected rows per pseudo-label. Typical use::

            out = fused_pseudo_label_loss(model(x_strong), model(x_weak).detach(), **kw)
            (sup_loss + lambda_u * out.loss).backward()
            threshold.update(out, weak_logits=..., indices=...)   # lepton_fast.thresholds

    Raises:
        TypeError: non-tensor or non-floating logits, class_thresholds or weights.
        ValueError: the two views' shapes differ, threshold outside [0, 1], temperature ≤
            0, class_thresholds not [C] or outside [0, 1], weights not [...] or negative or
            not finite, unknown reduction, a row that is entirely -inf or holds NaN (a weak
            row, or a strong row with a non-zero weight).
        RuntimeError: a forced backend that cannot run here (the message says why).

    The gradient is written during the forward into one buffer the size of strong_logits;
    the backward scales it in place (a second backward through the same graph raises).
    """
    _validate.logits("strong_logits", strong_logits)
    _validate.logits("weak_logits", weak_logits)
    _validate.same_shape("weak_logits", weak_logits, "strong_logits", strong_logits)
    threshold = _validate.in_unit_interval("threshold", threshold)
    temperature = _validate.positive_finite("temperature", temperature)
    soft = bool(soft)
    _validate.choice("reduction", reduction, REDUCTIONS)
    class_thresholds = _class_thresholds(class_thresholds, "strong_logits", strong_logits)
    weights = _weights(weights, "strong_logits", strong_logits)

    lead, n_classes = strong_logits.shape[:-1], strong_logits.shape[-1]
    strong = _validate.as_rows(strong_logits)
    weak = _validate.as_rows(weak_logits.detach().to(strong.dtype))
    chosen = _backend.resolve(LOSS_SPEC, strong.device, backend)
    if chosen == "reference":
        rows, labels, confidence, mask = reference.pseudo_label_loss_rows(
            strong, weak, threshold, temperature, soft, class_thresholds, weights
        )
        _validate.rows_defined(confidence, "fused_pseudo_label_loss: weak_logits")
        _validate.rows_defined(rows, "fused_pseudo_label_loss: strong_logits")
        loss = reference.reduce_rows(rows, reduction, max(rows.shape[0], 1))
    else:
        compute_grad = strong.requires_grad and torch.is_grad_enabled()
        loss, _, labels, confidence, mask = loss_op(
            strong, weak, class_thresholds, weights, threshold, temperature, soft, reduction, compute_grad, chosen
        )
    counts = reference.selected_class_counts(labels, mask, n_classes)
    return PseudoLabelLoss(
        loss.reshape(lead) if reduction == "none" else loss,
        labels.reshape(lead), confidence.reshape(lead), mask.reshape(lead), counts,
    )
