"""TRL drop-in: lepton_fast's fused losses behind trl 1.16's distillation functions.

    import lepton_fast.integrations.trl
    lepton_fast.integrations.trl.patch()   # before building the trainer

swaps in

- :func:`generalized_jsd_loss` for ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``
  (GKD, Agarwal et al. 2024), on :func:`lepton_fast.fused_kd_loss`: no log-softmax, mixture or
  [N, V] intermediate is kept for the backward, only the gradient;
- :func:`chunked_divergence_loss` for ``trl.trainer.distillation_trainer._chunked_divergence_loss``
  (``DistillationTrainer``), on :func:`lepton_fast.fused_linear_kd_loss`: the gradients are
  computed during the forward instead of projecting both heads again in the backward.

Both give trl's values and gradients for every argument, its quirks included (listed in each
docstring); ``tests/test_trl.py`` compares them with the installed trl. The module imports
nothing from trl until :func:`patch` runs.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from lepton_fast import _validate
from lepton_fast.ops.kd_loss import fused_kd_loss
from lepton_fast.ops.linear_kd_loss import _linear_kd, fused_linear_kd_loss

TRL_VERSION = "1.16"  # the release whose functions these reproduce
_IGNORE = -100  # trl's ignore value, fixed
# What trl's losses are, as fused_kd_loss's keywords: its generalized JSD, unscaled.
_TRL_KD = {"divergence": "jsd", "scale_by_t2": False}
# fused_linear_kd_loss's defaults, for the arguments trl does not set.
_LINEAR_DEFAULTS = {name: p.default for name, p in inspect.signature(fused_linear_kd_loss).parameters.items()
                    if p.default is not inspect.Parameter.empty}


def _rows_to_keep(mask: Tensor) -> Tensor:
    """Labels for the fused ops from a keep-mask: 0 where kept, -100 elsewhere (the soft loss
    reads no label value, and trl checks none)."""
    return torch.where(mask, 0, _IGNORE)


def _elementwise_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float) -> Tensor:
    """trl's per-element terms (reduction "none"): p_t (log p_t - log p_s) at beta 0,
    p_s (log p_s - log p_t) at beta 1, else beta p_t (log p_t - log m) + (1 - beta) p_s (log p_s - log m)."""
    log_s = torch.log_softmax(student_logits / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return log_t.exp() * (log_t - log_s)
    if beta == 1:
        return log_s.exp() * (log_s - log_t)
    b = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
    return b * log_t.exp() * (log_t - log_m) + (1 - b) * log_s.exp() * (log_s - log_m)


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """trl 1.16's ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` on the fused kernel
    (Agarwal et al. 2024, Eq. 1).

    JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, with
    p = softmax(logits / temperature); beta 0 is KL(p_t || p_s), 1 is KL(p_s || p_t).

    Args:
        student_logits: [..., V] (trl: [B, T, V]). Gradient flows here.
        teacher_logits: [..., V], a constant.
        labels: optional [...] ints; positions equal to -100 (trl's fixed ignore value) are left out.
        beta: in [0, 1]. temperature: > 0.
        reduction, num_items_in_batch: trl's reductions, quirks included:
            - ``num_items_in_batch`` given: the sum divided by it, whatever ``reduction`` is;
            - "batchmean": the sum over the kept positions divided by their count (at least 1),
              or without labels by ``student_logits.size(0)`` (the batch size, not B·T);
            - "sum": the sum;
            - "mean": the mean over elements, sum / (kept positions × V) (NaN when none is kept);
            - "none": the elementwise terms, [..., V], or [kept positions, V] with labels
              (computed as trl does, materialised: no fused kernel has elementwise output).
            No T² factor.

    Returns:
        The loss in ``student_logits``' dtype (computed in float32 at least).

    Raises:
        ValueError: beta outside [0, 1], temperature <= 0, mismatched shapes (from
            :func:`lepton_fast.fused_kd_loss`).
    """
    if reduction == "none" and num_items_in_batch is None:
        # No fused kernel has elementwise output; the hyper-parameters get the kernels' checks.
        _validate.kd_hyper_parameters(fused_kd_loss, temperature=temperature, beta=beta, **_TRL_KD)
        terms = _elementwise_jsd(student_logits, teacher_logits, beta, temperature)
        return terms if labels is None else terms[labels != _IGNORE]
    keep = None if labels is None else labels != _IGNORE
    total = fused_kd_loss(student_logits, teacher_logits, temperature, beta=beta,
                          labels=None if keep is None else _rows_to_keep(keep), reduction="sum", **_TRL_KD)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    elif reduction == "batchmean":
        loss = total / (keep.sum().clamp_min(1) if keep is not None else max(student_logits.size(0), 1))
    elif reduction == "sum":
        loss = total
    elif reduction == "mean":
        vocab = student_logits.shape[-1]
        if keep is None:
            loss = total / (student_logits.numel() if student_logits.numel() else float("nan"))
        else:
            count = keep.sum()
            # NaN when nothing is kept, as the mean of an empty tensor; the gradient stays 0 there.
            loss = torch.where(count > 0, total / (count.clamp_min(1) * vocab), float("nan"))
    else:
        raise ValueError(f"reduction must be one of ('batchmean', 'sum', 'mean', 'none'), got {reduction!r}")
    return loss.to(student_logits.dtype)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """trl's GEMM dtype: autocast's when it is on, else the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Optional[Union[Tensor, int]] = None,
    student_lm_head_bias: Optional[Tensor] = None,
    teacher_lm_head_bias: Optional[Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """trl 1.16's ``distillation_trainer._chunked_divergence_loss`` on :func:`fused_linear_kd_loss`.

    The generalized JSD (as :func:`generalized_jsd_loss`, no T²) between the student's and the
    teacher's next-token distributions, from their final hidden states and lm_heads, the logits
    z = softcap·tanh(scale·(h W^T + b)/softcap) never materialised.

    Args:
        student_hidden_states: [B, K, H_s] (any [..., H_s]). Gradient flows here.
        teacher_hidden_states: [B, K, H_t], same leading dims; a constant.
        student_lm_head_weight: [V, H_s]; gradient flows here. teacher_lm_head_weight: [V, H_t].
        completion_mask: [B, K]; nonzero marks the positions in the loss.
        beta: in [0, 1]; 0 forward KL, 1 reverse KL.
        num_items_in_batch: the summed loss is divided by it (gradient accumulation); None:
            by the count of kept positions (at least 1).
        student_lm_head_bias, teacher_lm_head_bias: optional [V]; the student's gets a gradient.
        student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
        teacher_final_logit_softcapping, temperature: as trl applies them (scale, softcap,
            then / temperature).

    Returns:
        (loss float32, the summed entropy in nats of the student's softmax(z / T) over the kept
        positions, float32 and without gradient, the count of kept positions int64), all over
        the local batch, as trl returns them.

    Weights are DTensors under FSDP2: gathered once with ``full_tensor()`` as trl does. Under
    autocast (or with weights of another dtype than the hidden states) both GEMM operands are
    cast to the compute dtype, as trl's ``_compute_dtype``.
    """
    distributed_tensor = getattr(torch.distributed, "tensor", None)
    dtensor = getattr(distributed_tensor, "DTensor", None) if distributed_tensor is not None else None
    heads = []
    for hidden, weight, bias in ((student_hidden_states, student_lm_head_weight, student_lm_head_bias),
                                 (teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias)):
        if dtensor is not None and isinstance(weight, dtensor):
            weight = weight.full_tensor().to(hidden.dtype)
            bias = bias.full_tensor() if bias is not None else None
        dtype = _compute_dtype(hidden)
        heads.append((hidden.to(dtype), weight.to(dtype), bias))
    (h_s, w_s, b_s), (h_t, w_t, b_t) = heads
    keep = completion_mask != 0
    n_valid = keep.sum()
    by_count = num_items_in_batch is None
    loss, entropy_sum = _linear_kd(h_s, w_s, h_t, w_t, **{
        **_LINEAR_DEFAULTS, **_TRL_KD, "temperature": temperature, "student_bias": b_s, "teacher_bias": b_t,
        "beta": beta, "labels": _rows_to_keep(keep), "ignore_index": _IGNORE,
        "reduction": "mean" if by_count else "sum",
        "student_logit_scale": student_logit_scale, "teacher_logit_scale": teacher_logit_scale,
        "student_softcap": student_final_logit_softcapping, "teacher_softcap": teacher_final_logit_softcapping,
        "entropy": True})
    if not by_count:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


_TARGETS = (
    # (module, attribute path, replacement, wrap): what patch() swaps
    ("trl.experimental.gkd.gkd_trainer", ("GKDTrainer", "generalized_jsd_loss"), generalized_jsd_loss, staticmethod),
    ("trl.trainer.distillation_trainer", ("_chunked_divergence_loss",), chunked_divergence_loss, None),
)


_ORIGINALS: dict = {}  # (owner, name) -> trl's own function, from the first patch()


def patch() -> Callable[[], None]:
    """Swap :func:`generalized_jsd_loss` into ``trl.experimental.gkd.GKDTrainer`` and
    :func:`chunked_divergence_loss` into ``trl.trainer.distillation_trainer`` (where
    ``DistillationTrainer`` looks it up at every step). Calling it again changes nothing.
    Returns a function that puts trl's own functions back.

    Raises:
        ImportError: trl is not installed (``pip install "lepton_fast[trl]"``).
    """
    for module_name, path, replacement, wrap in _TARGETS:
        try:
            with warnings.catch_warnings():
                # trl warns on every import of trl.experimental; the import is ours, not the user's.
                warnings.filterwarnings("ignore", message=".*trl.experimental")
                owner = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != "trl":
                raise
            raise ImportError(f"lepton_fast.integrations.trl.patch() needs trl 1.16 ({module_name} could not be "
                              'imported): pip install "lepton_fast[trl]"') from e
        for name in path[:-1]:
            owner = getattr(owner, name)
        _ORIGINALS.setdefault((owner, path[-1]), owner.__dict__[path[-1]])
        setattr(owner, path[-1], wrap(replacement) if wrap else replacement)
    return unpatch


def unpatch() -> None:
    """Put back trl's own functions that :func:`patch` replaced."""
    while _ORIGINALS:
        (owner, name), original = _ORIGINALS.popitem()
        setattr(owner, name, original)
