"""Batched weak and strong views of 28×28 digit images in [0, 1] (FixMatch's two views).

Both take ``x [N, 1, H, W]`` and a ``torch.Generator`` on x's device, so a run with a
seeded generator is reproducible and a checkpoint can save the generator's state.

- weak: a random whole-pixel translation of up to 2 pixels (FixMatch's "flip-and-shift", minus the
  flip, which does not preserve digits).
- strong: a random affine map (rotation ±20°, scale 0.85–1.15, shear ±0.25, translation
  up to 3 px), then per image one stroke change (thicker by a 3×3 dilation, thinner by an
  erosion, or unchanged), a contrast change and an 8×8 cut-out (RandAugment-style
  operations that keep the digit's class; DeVries & Taylor 2017 for the cut-out).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
