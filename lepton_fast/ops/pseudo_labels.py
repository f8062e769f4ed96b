"""Confidence-thresholded pseudo-labels: selection, and FixMatch's unlabeled loss in one pass."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate

# Pseudo-labels of [N, C] logits: (labels int64 [N], confidence [N] float32 (float64 for float64),
# mask bool [N]), mask = confidence >= threshold, or >= class_thresholds[label].
SELECT_SPEC = _backend.define(
    "select_pseudo_labels(Tensor logits, Tensor threshold, Tensor temperature, Tensor? class_thresholds) "
    "-> (Tensor labels, Tensor confidence, Tensor mask)",
    triton="pseudo_labels")
# FixMatch's unlabeled loss (csrc/pseudo_labels.h): pseudo-labels from the weak view, masked
# cross-entropy on the strong view. Returns (loss, d(loss)/d(strong) or an empty tensor, labels
# int64 [N], confidence [N], mask bool [N], class_counts int64 [C]). "mean" divides by N. The row
# weight is weights[row] ([N]) when given, else the mask.
LOSS_SPEC = _backend.define(
    "fused_pseudo_label_loss(Tensor strong_logits, Tensor weak_logits, Tensor threshold, Tensor temperature, "
    "bool soft, Tensor? class_thresholds, Tensor? weights, str reduction, bool compute_grad) "
    "-> (Tensor loss, Tensor grad, Tensor labels, Tensor confidence, Tensor mask, Tensor class_counts)",
    triton="pseudo_labels", saves_grad=True)

Scalar = Union[float, Tensor]


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


def _acc_dtype(*logits: Tensor) -> torch.dtype:
    """The kernels' accumulation dtype for these logits (read in the widest of their dtypes)."""
    dtype = torch.float32
    for x in logits:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


@torch.library.register_fake("lepton_fast::select_pseudo_labels")
def _(logits, threshold, temperature, class_thresholds):
    n = logits.shape[0]
    conf_dtype = torch.promote_types(logits.dtype, torch.float32)
    return (
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((n,), dtype=conf_dtype),
        logits.new_empty((n,), dtype=torch.bool),
    )


@torch.library.register_fake("lepton_fast::fused_pseudo_label_loss")
def _(strong_logits, weak_logits, threshold, temperature, soft, class_thresholds, weights, reduction,
      compute_grad):
    n, c = strong_logits.shape
    acc = torch.promote_types(strong_logits.dtype, torch.float32)
    return (
        strong_logits.new_empty((n,) if reduction == "none" else (), dtype=acc),
        torch.empty_like(strong_logits) if compute_grad else strong_logits.new_empty((0,)),
        strong_logits.new_empty((n,), dtype=torch.int64),
        strong_logits.new_empty((n,), dtype=acc),
        strong_logits.new_empty((n,), dtype=torch.bool),
        strong_logits.new_empty((c,), dtype=torch.int64),
    )


def select_pseudo_labels(
    logits: Tensor,
    threshold: Scalar = 0.95,
    temperature: Scalar = 1.0,
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
        threshold: in [0, 1]; ignored when ``class_thresholds`` is given. A float or a 0-d
            CPU tensor (as is temperature): a 0-d tensor that changes every step never
            recompiles a ``torch.compile`` graph, a Python float once.
        temperature: T > 0 (T < 1 sharpens, so raises the confidence); every backend agrees
            with the float64 reference over the documented range 1e-8 <= T <= 1e4.
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
    threshold_t, temperature_t = _validate.pseudo_label_scalars(threshold, temperature)
    class_thresholds = _validate.class_thresholds(class_thresholds, "logits", logits, _acc_dtype(logits))
    lead = logits.shape[:-1]
    x = _validate.as_rows(logits.detach())
    device_type = _backend.device_type(x)
    labels, confidence, mask = _backend.call(SELECT_SPEC, _backend.resolve_type(SELECT_SPEC, device_type, backend),
                                             device_type, x, threshold_t, temperature_t, class_thresholds)
    return PseudoLabels(labels.reshape(lead), confidence.reshape(lead), mask.reshape(lead))


def fused_pseudo_label_loss(
    strong_logits: Tensor,
    weak_logits: Tensor,
    threshold: Scalar = 0.95,
    temperature: Scalar = 1.0,
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
        weak_logits: [..., C], same shape; a constant (detached). Of another dtype, both
            views are read in the wider of the two (never rounded to the narrower), and the
            gradient comes back in the strong view's dtype.
        threshold: τ in [0, 1]; ignored when ``class_thresholds`` is given. A float or a
            0-d CPU tensor (as is temperature): a 0-d tensor that changes every step never
            recompiles a ``torch.compile`` graph, a Python float once.
        temperature: T > 0 for the weak view's confidence and soft target, in the documented
            range 1e-8 <= T <= 1e4 (as select_pseudo_labels).
        soft: use softmax(weak / T) as the target instead of the hard pseudo-label.
        class_thresholds: optional [C] tensor of per-class thresholds in [0, 1]
            (FlexMatch, FreeMatch).
        weights: optional [...] per-row weights, finite and ≥ 0, used instead of the mask.
        reduction: ``"mean"`` (= ``"batchmean"``: sum / number of rows), ``"sum"``, or
            ``"none"`` ([...]).
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
    threshold_t, temperature_t = _validate.pseudo_label_scalars(threshold, temperature)
    soft = bool(soft)
    _validate.choice("reduction", reduction, _validate.REDUCTIONS)
    if class_thresholds is not None or weights is not None:
        acc = _acc_dtype(strong_logits, weak_logits)
        class_thresholds = _validate.class_thresholds(class_thresholds, "strong_logits", strong_logits, acc)
        weights = _validate.row_weights(weights, "strong_logits", strong_logits, acc)

    strong, weak = _validate.common_dtype(strong_logits, _validate.constant(weak_logits))
    strong, weak = _validate.as_rows(strong), _validate.as_rows(weak)
    compute_grad = strong.requires_grad and torch.is_grad_enabled()
    device_type = _backend.device_type(strong)
    loss, _, labels, confidence, mask, counts = _backend.call(
        LOSS_SPEC, _backend.resolve_type(LOSS_SPEC, device_type, backend), device_type, strong, weak, threshold_t,
        temperature_t, soft, class_thresholds, weights, reduction, compute_grad,
    )
    if strong_logits.dim() != 2:  # the outputs are per row of [N, C] (reshaping costs a tenth of a tiny call)
        lead = strong_logits.shape[:-1]
        loss = loss.reshape(lead) if reduction == "none" else loss
        labels, confidence, mask = labels.reshape(lead), confidence.reshape(lead), mask.reshape(lead)
    return PseudoLabelLoss(loss, labels, confidence, mask, counts)
