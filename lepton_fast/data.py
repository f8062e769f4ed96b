"""The small dataset type the trainers and the demo tasks share.

The example data sets themselves live with their tasks (:mod:`lepton_fast.tasks`); the
trainers need none of them: they take any tensors, Dataset or DataLoader.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class IndexedTensorDataset(Dataset):
    """``(x[i], y[i], i)`` for tensors ``x [N, ...]`` and ``y [N]`` (integer labels, kept as int64)."""

    def __init__(self, x: Tensor, y: Tensor):
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("x and y must be torch.Tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i], torch.tensor(i)


__all__ = ["IndexedTensorDataset"]
