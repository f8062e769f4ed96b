"""Argument checks shared by the ops. Each error names the argument it is about."""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "batchmean", "sum", "none")


def logits(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a class dimension [..., C], got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def positive_finite(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def in_unit_interval(name: str, value, *, open_right: bool = False) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0) or (open_right and value == 1.0):
        interval = "[0, 1)" if open_right else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def no_bad_values(bad: Tensor, message: str, values: Tensor | None = None) -> None:
    """Raise ValueError(message) if any element of the bool tensor ``bad`` is set.

    Reading a tensor's values costs a host synchronisation off the CPU, so there the check
    is torch._assert_async (it raises at the next synchronisation instead); on the CPU and in
    eager mode it raises at once, quoting up to five offending ``values``.
    """
    if bad.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            quoted = f"; got {values[bad][:5].tolist()}" if values is not None else ""
            raise ValueError(message + quoted)
    else:
        torch._assert_async(~bad.any(), message)


def as_rows(x: Tensor) -> Tensor:
    """[..., C] -> [N, C] with unit stride along C, as the kernels read it (a view when possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def class_labels(name: str, labels, logits_name: str, x: Tensor, ignore_index: int) -> Tensor:
    """Integer labels of shape x.shape[:-1], each in [0, C) or equal to ignore_index.

    The range check reads the labels (O(N)); see no_bad_values.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(x.shape[:-1])} to match {logits_name} {tuple(x.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != x.device:
        raise ValueError(f"{name} is on {labels.device} but {logits_name} is on {x.device}")
    n_classes = x.shape[-1]
    bad = ((labels < 0) | (labels >= n_classes)) & (labels != ignore_index)
    no_bad_values(bad, f"{name} must be in [0, {n_classes}) or equal ignore_index={ignore_index}", labels)
    return labels.long()


def rows_defined(rows: Tensor, what: str) -> None:
    """Kernels give NaN for a row that is entirely -inf (or holds NaN): turn it into an error.

    O(N) read of the per-row losses; no host synchronisation off the CPU.
    """
    no_bad_values(torch.isnan(rows), f"{what}: a row is entirely -inf, or holds +inf or NaN, so its softmax is undefined")
