"""Real data for the examples, one module per case, and the small dataset type they share.

- :mod:`lepton_fast.data.digits`: MNIST → scikit-learn digits (``mnist_source``,
  ``digits_target``) and the digit views ``weak_view`` / ``strong_view``, re-exported here.

The sets need the optional ``examples`` extra (``pip install "lepton_fast[examples]"``).
The trainers need none of this: they take any tensors, Dataset or DataLoader.
"""
from __future__ import annotations

import importlib

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


def need_extra(module: str):
    """Import ``module`` of the ``examples`` extra, or say how to install it (ImportError)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"lepton_fast.data needs {module.split('.')[0]} for the example data sets; install the "
            f'extra: pip install "lepton_fast[examples]"'
        ) from e


from lepton_fast.data.digits import (  # noqa: E402  (digits imports the names above)
    NUM_CLASSES,
    TargetSplit,
    digits_target,
    frame_digits,
    mnist_source,
    strong_view,
    weak_view,
)

__all__ = ["IndexedTensorDataset", "NUM_CLASSES", "TargetSplit", "digits_target", "frame_digits", "mnist_source",
           "need_extra", "strong_view", "weak_view"]
