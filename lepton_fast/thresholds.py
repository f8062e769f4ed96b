"""Stateful confidence thresholds for pseudo-labels: fixed, FlexMatch, FreeMatch, SoftMatch.

Every class here is an ``nn.Module`` with one interface, made for a training loop::

    policy = FreeMatchThreshold(num_classes=10)          # or Fixed/FlexMatch/SoftMatch
    for step, (x_w, x_s, idx) in enumerate(unlabeled):
        weak = model(x_w).detach()
        out = fused_pseudo_label_loss(model(x_s), weak, **policy.loss_kwargs(weak))
        (sup_loss + lambda_u * out.loss).backward()
        policy.update(out, weak_logits=weak, indices=idx)

- ``loss_kwargs(weak_logits=None) -> dict``: the keyword arguments (``threshold``,
  ``class_thresholds`` [C] or ``weights`` [...]) of :func:`fused_pseudo_label_loss` and
  :func:`select_pseudo_labels` for this batch. Calling the module is the same call.
- ``update(result, *, weak_logits=None, indices=None)``: advance the state with what the
  loss (or :func:`select_pseudo_labels`) returned: ``result.labels``, ``result.confidence``.
  Each class says which of ``weak_logits`` / ``indices`` it needs, and raises ValueError
  naming the one that is missing.

A policy built for C classes refuses, in every method, ``weak_logits`` whose last
dimension is not C (ValueError naming the argument). ``update`` refuses (ValueError naming
the argument) a ``result.confidence`` holding NaN or ±inf and ``weak_logits`` with a row
whose softmax is undefined (a NaN or +inf, or every entry -inf), before any state changes:
a refused update leaves the state as it was, instead of a NaN threshold from then on. On
CUDA that check is ``torch._assert_async`` (no host synchronisation): it fails at the next
synchronisation as a device-side assert, which ends the process's CUDA context, so there
the run resumes from its last checkpoint.

The state lives in registered buffers, so ``state_dict()`` saves it and
``load_state_dict()`` resumes a run where it stopped; ``.to(device)`` moves it. Nothing
synchronises with the host. The confidences are meant to be at temperature 1, as the
papers use them.

Order: USB (Wang et al. 2022, the reference implementations) updates FreeMatch's and
SoftMatch's state with the current batch before masking it; the loop above masks with the
state through the previous batch, so that the loss stays one pass. With the papers'
momentum 0.999 this moves the threshold by a thousandth of one batch's statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import lepton_fast
from lepton_fast import _validate


def _momentum(value) -> float:
    return _validate.in_unit_interval("momentum", value, open_right=True)


_WHAT = {
    "indices": "each row's position in the unlabeled set, e.g. the index that "
               "lepton_fast.data.IndexedTensorDataset yields as (x, y, index); CrossDomainTrainer passes it itself",
    "weak_logits": "the weak view's logits [..., C]",
}


def _required(name: str, value, who: str) -> Tensor:
    if value is None:
        raise ValueError(f"{who}.update needs {name}: {_WHAT[name]}")
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value.detach()


class PseudoLabelThreshold(nn.Module):
    """The interface shared by the thresholds in this module (see the module docstring)."""

    num_classes: Optional[int] = None  # C, for the policies whose state is per class

    def _check_logits(self, name: str, logits: Optional[Tensor]) -> None:
        """``logits`` [..., C] of this policy's C classes (or None)."""
        if logits is None or self.num_classes is None:
            return
        if not isinstance(logits, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dim() == 0 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"{name} must have {self.num_classes} classes (its last dimension), as "
                             f"{type(self).__name__} was built for, got shape {tuple(logits.shape)}")

    def _check_update(self, result, weak_logits: Optional[Tensor]) -> None:
        """What every ``update`` checks before it changes any state."""
        who = f"{type(self).__name__}.update"
        self._check_logits("weak_logits", weak_logits)
        if weak_logits is not None:
            _validate.defined_rows("weak_logits", weak_logits, who)
        _validate.finite("result.confidence", result.confidence.detach(), f"{who} (the state is left as it was)")

    def loss_kwargs(self, weak_logits: Optional[Tensor] = None) -> dict:
        raise NotImplementedError

    def update(self, result, *, weak_logits: Optional[Tensor] = None, indices: Optional[Tensor] = None) -> None:
        raise NotImplementedError

    def forward(self, weak_logits: Optional[Tensor] = None) -> dict:
        return self.loss_kwargs(weak_logits)


class FixedThreshold(PseudoLabelThreshold):
    """FixMatch's fixed confidence threshold τ (Sohn et al. 2020; τ = 0.95). No state."""

    def __init__(self, threshold: float = 0.95):
        super().__init__()
        self.threshold = _validate.in_unit_interval("threshold", threshold)

    def loss_kwargs(self, weak_logits=None) -> dict:
        return {"threshold": self.threshold}

    def update(self, result, *, weak_logits=None, indices=None) -> None:
        self._check_update(result, weak_logits)  # no state, but the same contract as the others

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class FlexMatchThreshold(PseudoLabelThreshold):
    r"""FlexMatch's curriculum pseudo-labelling (Zhang et al. 2021, NeurIPS), as in USB.

    Each unlabeled sample remembers its last prediction whose confidence reached τ
    (buffer ``selected_label`` [num_unlabeled], -1 before any). With σ(c) the number of
    samples so predicted as class c, the learning status is

    .. math:: \beta(c) = \sigma(c) / \max\bigl(\max_{c'} \sigma(c'),\; N - \textstyle\sum_{c'} \sigma(c')\bigr)

    with threshold warm-up (``warmup=True``: the unused count N − Σσ joins the max), or
    σ(c) / max σ without. It is recomputed after each update unless one value (a class,
    or "unused") holds every sample, as USB does. The class thresholds are
    τ·M(β(c)) with the convex mapping M(x) = x / (2 − x), so they start at 0 and grow to τ.

    Args:
        num_classes: C.
        num_unlabeled: N, the size of the unlabeled set; ``update`` needs each row's index.
        threshold: τ in [0, 1], 0.95 as in the paper.
        warmup: threshold warm-up (default True, as in the paper and USB).

    ``update(result, indices=...)``: ``indices`` [...] (any integer dtype), each row's
    position in the unlabeled set, in [0, num_unlabeled); ``result.labels`` in [0, C).
    """

    def __init__(self, num_classes: int, num_unlabeled: int, threshold: float = 0.95, warmup: bool = True):
        super().__init__()
        self.num_classes = _validate.integer("num_classes", num_classes, 1)
        self.num_unlabeled = _validate.integer("num_unlabeled", num_unlabeled, 1)
        self.threshold = _validate.in_unit_interval("threshold", threshold)
        self.warmup = bool(warmup)
        self.register_buffer("selected_label", torch.full((num_unlabeled,), -1, dtype=torch.int64))
        self.register_buffer("classwise_acc", torch.zeros(num_classes, dtype=torch.float32))

    def class_thresholds(self) -> Tensor:
        """[C] float32: τ · β(c) / (2 − β(c))."""
        beta = self.classwise_acc
        return self.threshold * beta / (2.0 - beta)

    def loss_kwargs(self, weak_logits=None) -> dict:
        self._check_logits("weak_logits", weak_logits)
        return {"threshold": self.threshold, "class_thresholds": self.class_thresholds()}

    @torch.no_grad()
    def update(self, result, *, weak_logits=None, indices=None) -> None:
        self._check_update(result, weak_logits)
        indices = _required("indices", indices, type(self).__name__).reshape(-1).to(self.selected_label.device)
        labels = result.labels.reshape(-1)
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.shape != labels.shape:
            raise ValueError(f"indices must have one entry per row ({labels.numel()}), got shape "
                             f"{tuple(indices.shape)}")
        indices = indices.long()
        _validate.no_bad_values((indices < 0) | (indices >= self.num_unlabeled),
                                f"indices must be positions in the unlabeled set, in [0, num_unlabeled="
                                f"{self.num_unlabeled})", indices)
        _validate.no_bad_values((labels < 0) | (labels >= self.num_classes),
                                f"result.labels must be classes in [0, num_classes={self.num_classes})", labels)
        reached = result.confidence.reshape(-1) >= self.threshold
        self.selected_label[indices] = torch.where(reached, labels, self.selected_label[indices])
        # counts[0] = unused samples, counts[1 + c] = sigma(c).
        counts = torch.zeros(self.num_classes + 1, dtype=torch.int64, device=labels.device)
        counts.index_add_(0, self.selected_label + 1, torch.ones_like(self.selected_label))
        top = counts.max()
        denominator = top if self.warmup else counts[1:].max()
        beta = counts[1:].to(torch.float32) / denominator.clamp(min=1).to(torch.float32)
        self.classwise_acc.copy_(torch.where(top < self.num_unlabeled, beta, self.classwise_acc))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_unlabeled={self.num_unlabeled}, "
                f"threshold={self.threshold}, warmup={self.warmup}")


class FreeMatchThreshold(PseudoLabelThreshold):
    r"""FreeMatch's self-adaptive thresholds (Wang et al. 2023, ICLR), as in USB.

    Global threshold: the EMA of the mean confidence, τ ← m·τ + (1 − m)·mean(max p),
    starting at 1/C (buffer ``time_p``). Class-wise: the EMA of the class-mean
    probabilities, p̃ ← m·p̃ + (1 − m)·mean_rows(p), starting uniform at 1/C (buffer
    ``p_model`` [C]). Class threshold τ_c = τ · p̃_c / max_c' p̃_c'.

    Args:
        num_classes: C.
        momentum: m in [0, 1), 0.999 as in the paper.

    ``update(result, weak_logits=...)``: the mean of ``result.confidence``, and
    softmax(weak_logits) averaged over the rows (weak_logits [..., C]).
    """

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__()
        self.num_classes = _validate.integer("num_classes", num_classes, 1)
        self.momentum = _momentum(momentum)
        self.register_buffer("time_p", torch.tensor(1.0 / num_classes, dtype=torch.float32))
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32))

    def class_thresholds(self) -> Tensor:
        """[C] float32: τ · p̃ / max p̃."""
        return self.time_p * self.p_model / self.p_model.max()

    def loss_kwargs(self, weak_logits=None) -> dict:
        self._check_logits("weak_logits", weak_logits)
        return {"class_thresholds": self.class_thresholds()}

    @torch.no_grad()
    def update(self, result, *, weak_logits=None, indices=None) -> None:
        weak = _required("weak_logits", weak_logits, type(self).__name__)
        self._check_update(result, weak)
        confidence = result.confidence.reshape(-1)
        if confidence.numel() == 0:
            return
        m = self.momentum
        probs = torch.softmax(weak.reshape(-1, self.num_classes).to(torch.float32), -1)
        self.time_p.mul_(m).add_((1 - m) * confidence.to(torch.float32).mean())
        self.p_model.mul_(m).add_((1 - m) * probs.mean(0))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, momentum={self.momentum}"


class SoftMatchWeight(PseudoLabelThreshold):
    r"""SoftMatch's truncated-Gaussian sample weights (Chen et al. 2023, ICLR), as in USB.

    With the EMA of the batch mean μ ← m·μ + (1 − m)·mean(c) (start 1/C, buffer
    ``mu``) and of the unbiased batch variance σ² ← m·σ² + (1 − m)·var(c) (start 1,
    buffer ``var``) of the confidence c = max p, each row's weight is

    .. math:: \lambda(c) = \lambda_{max} \exp\Bigl(-\frac{\min(c - \mu, 0)^2}{2\sigma^2 / n_\sigma^2}\Bigr)

    so rows at or above the mean weigh λ_max and the weight falls off below it.

    Args:
        num_classes: C (sets μ's start, 1/C).
        n_sigma: the Gaussian's width divisor n_σ > 0, 2 as in USB.
        momentum: m in [0, 1), 0.999 as in the paper.
        lambda_max: λ_max > 0, 1.

    ``loss_kwargs(weak_logits)`` needs the weak view (it reads it once, for the
    confidences) and returns ``{"threshold": 0.0, "weights": λ(c)}``; ``update(result)``
    uses ``result.confidence`` alone. A batch of one row leaves σ² unchanged (no unbiased
    variance).
    """

    def __init__(self, num_classes: int, n_sigma: float = 2.0, momentum: float = 0.999, lambda_max: float = 1.0):
        super().__init__()
        self.num_classes = _validate.integer("num_classes", num_classes, 1)
        self.n_sigma = _validate.positive_finite("n_sigma", n_sigma)
        self.momentum = _momentum(momentum)
        self.lambda_max = _validate.positive_finite("lambda_max", lambda_max)
        self.register_buffer("mu", torch.tensor(1.0 / num_classes, dtype=torch.float32))
        self.register_buffer("var", torch.tensor(1.0, dtype=torch.float32))

    def weights(self, confidence: Tensor) -> Tensor:
        """float32 [...] weights λ(c) of confidences [...]."""
        below = torch.clamp(confidence.to(torch.float32) - self.mu, max=0.0)
        return self.lambda_max * torch.exp(-below.square() / (2.0 * self.var / self.n_sigma**2))

    def loss_kwargs(self, weak_logits=None) -> dict:
        if weak_logits is None:
            raise ValueError("SoftMatchWeight.loss_kwargs needs weak_logits (the weights depend on the confidence)")
        self._check_logits("weak_logits", weak_logits)
        confidence = lepton_fast.select_pseudo_labels(weak_logits.detach(), threshold=0.0).confidence
        return {"threshold": 0.0, "weights": self.weights(confidence)}

    @torch.no_grad()
    def update(self, result, *, weak_logits=None, indices=None) -> None:
        self._check_update(result, weak_logits)
        confidence = result.confidence.reshape(-1).to(torch.float32)
        if confidence.numel() == 0:
            return
        m = self.momentum
        self.mu.mul_(m).add_((1 - m) * confidence.mean())
        if confidence.numel() > 1:
            self.var.mul_(m).add_((1 - m) * confidence.var(correction=1))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, n_sigma={self.n_sigma}, momentum={self.momentum}, "
                f"lambda_max={self.lambda_max}")


__all__ = ["FixedThreshold", "FlexMatchThreshold", "FreeMatchThreshold", "PseudoLabelThreshold", "SoftMatchWeight"]
