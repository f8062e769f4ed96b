"""Two statistic-matching transfer terms of CrossDomainTrainer, in plain torch: Deep CORAL
on features and Minimum Class Confusion on target logits. Both are functions of one batch
(no state), so a checkpoint needs nothing more for them."""
from __future__ import annotations

import torch
from torch import Tensor

from lepton_fast import _validate

MCC_TEMPERATURE = 2.5  # Jin et al. 2020's default


def _rows(name: str, x: Tensor, least: int) -> Tensor:
    if x.dim() != 2 or x.shape[0] < least:
        raise ValueError(f"{name} must be [N, D] with N >= {least}, got shape {tuple(x.shape)}")
    return x.float()


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL (Sun & Saenko 2016): ``‖C_s − C_t‖_F² / (4 d²)``, with C the unbiased
    covariance (divisor N − 1) of each batch's features.

    Args:
        source: [N_s, d] source features, N_s ≥ 2 (any floating dtype; computed in float32).
        target: [N_t, d] target features, N_t ≥ 2.

    Returns a 0-d float32 tensor, differentiable in both inputs.

    Raises:
        ValueError: not 2-D, fewer than 2 rows (no covariance), or different widths.
    """
    s, t = _rows("source", source, 2), _rows("target", target, 2)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"source and target features must have the same width, got {s.shape[1]} and {t.shape[1]}")
    d = s.shape[1]
    return (torch.cov(s.T) - torch.cov(t.T)).square().sum() / (4 * d * d)


def mcc_loss(logits: Tensor, temperature: float = MCC_TEMPERATURE) -> Tensor:
    """Minimum Class Confusion (Jin et al. 2020) of unlabeled target logits.

    With p = softmax(logits / T) [B, C], each row weighted by w_i ∝ 1 + exp(−H(p_i))
    (entropy H, held constant; the weights sum to B), the class confusion
    ``M = pᵀ diag(w) p`` [C, C] is normalised row by row and its off-diagonal mass averaged
    over the classes: ``Σ_j Σ_{k≠j} M_jk / Σ_k M_jk / C`` in [0, 1). It pushes each
    sample's prediction towards one class without favouring a class over the others, as
    thuml's Transfer-Learning-Library does (``tllib.alignment.mcc``).

    Args:
        logits: [B, C] target logits, B ≥ 1 (any floating dtype; computed in float32).
        temperature: T > 0 (the paper's default 2.5).

    Returns a 0-d float32 tensor. Raises ValueError for a shape other than [B, C] with
    B ≥ 1 or a temperature that is not a positive finite number.
    """
    temperature = _validate.positive_finite("temperature", temperature)
    p = torch.softmax(_rows("logits", logits, 1) / temperature, 1)
    with torch.no_grad():
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
        w = 1 + torch.exp(-entropy)
        w = w * (p.shape[0] / w.sum())
    confusion = (p * w[:, None]).T @ p
    # a class no row gives any probability (underflow) has no confusion, not 0/0
    confusion = confusion / confusion.sum(1, keepdim=True).clamp_min(torch.finfo(confusion.dtype).tiny)
    return (confusion.sum() - confusion.trace()) / p.shape[1]


__all__ = ["MCC_TEMPERATURE", "coral_loss", "mcc_loss"]
