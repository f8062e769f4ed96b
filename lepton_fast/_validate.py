"""Argument checks, in one place: every public op checks its arguments here, once, before
any kernel runs. Each error names the argument it is about.

Floating hyper-parameters (temperature, beta, eps, thresholds, ...) reach the kernels as 0-d
float64 CPU tensors, not Python floats: torch.compile specialises a custom op's float
arguments (one graph per value), while a tensor argument keeps one graph for a value that
changes every step (a curriculum, a warm-up, a schedule). Values are checked eagerly when
they are concrete and with ``torch._check`` (a guard or runtime assert) under tracing.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "batchmean", "sum", "none")

# The scalar tensors of recent values: a training loop passes the same few values every
# step, and a lookup costs a tenth of a new tensor (whose cost shows at tiny shapes).
_SCALARS: dict[float, Tensor] = {}
_MAX_CACHED = 1024


def _scalar_tensor(value: float) -> Tensor:
    t = _SCALARS.get(value)
    if t is None:
        if len(_SCALARS) >= _MAX_CACHED:
            _SCALARS.clear()
        t = _SCALARS[value] = torch.scalar_tensor(value, dtype=torch.float64)
    return t


def hyper(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
          hi_open: bool = False) -> Tensor:
    """A floating hyper-parameter as the kernels take it: a 0-d float64 CPU tensor.

    ``value`` is a Python number or a 0-d CPU tensor; it must be finite and lie between
    ``lo`` and ``hi`` (open ends as flagged). Raises TypeError for another type, ValueError
    for a value outside the interval.
    """
    kind = type(value)
    if (kind is float or kind is int) and not torch.compiler.is_compiling():  # the common case, first
        inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if inside and math.isfinite(value):
            return _scalar_tensor(float(value))
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            raise ValueError(
                f"{name} must be a number or a 0-d CPU tensor (reading a {value.device.type} tensor on the host "
                "would synchronise the device): pass a float, or keep the schedule on the CPU"
            )
        if not (value.is_floating_point() or value.dtype in INT_DTYPES):
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        t = value.detach().reshape(()).to(torch.float64)
        if torch.compiler.is_compiling():
            return _traced_in_interval(name, t, lo, hi, lo_open, hi_open, interval)
        concrete = float(t)
    elif torch.compiler.is_compiling():
        # A traced float (a SymFloat once it changes between calls) stays symbolic only as
        # long as every use of it is tensor arithmetic: a torch._check on it, or a new tensor
        # made from it, would specialise the graph to its value.
        return _traced_in_interval(name, torch.zeros((), dtype=torch.float64) + value, lo, hi, lo_open, hi_open,
                                   interval)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    else:
        t, concrete = None, float(value)
    inside = (lo < concrete if lo_open else lo <= concrete) and (concrete < hi if hi_open else concrete <= hi)
    if not (math.isfinite(concrete) and inside):
        raise ValueError(f"{name} must be a finite number in {interval}, got {concrete}")
    return _scalar_tensor(concrete) if t is None else t


def _traced_in_interval(name, t, lo, hi, lo_open, hi_open, interval) -> Tensor:
    ok = torch.isfinite(t) & (t > lo if lo_open else t >= lo) & (t < hi if hi_open else t <= hi)
    torch._assert_async(ok, f"{name} must be a finite number in {interval}")
    return t


def positive(name: str, value) -> Tensor:
    """A finite number > 0 (a temperature)."""
    return hyper(name, value, 0.0, math.inf, lo_open=True, hi_open=True)


def non_negative(name: str, value) -> Tensor:
    """A finite number >= 0 (a step size, a radius)."""
    return hyper(name, value, 0.0, math.inf, hi_open=True)


def unit_interval(name: str, value) -> Tensor:
    """A number in [0, 1] (a weight, a probability threshold)."""
    return hyper(name, value, 0.0, 1.0)


def in_unit_interval(name: str, value, *, open_right: bool = False) -> float:
    """A Python float in [0, 1] (or [0, 1)), for module constructors' fixed settings."""
    value = float(value)
    if not (0.0 <= value <= 1.0) or (open_right and value == 1.0):
        interval = "[0, 1)" if open_right else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def positive_finite(name: str, value) -> float:
    """A Python float > 0, for module constructors' fixed settings."""
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def zero(name: str, value, message: str) -> None:
    """ValueError(message) unless the number (or 0-d tensor) ``value`` is 0: an argument that
    needs another one to be given (alpha > 0 needs labels)."""
    if torch.compiler.is_compiling():
        if isinstance(value, Tensor):
            torch._assert_async(value == 0, message)
        else:
            torch._check(value == 0, lambda: message)
    elif float(value) != 0:
        raise ValueError(f"{message} ({name}={float(value)})")


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def logits(name: str, x, *, empty_ok: bool = False) -> Tensor:
    """Floating logits [..., C]; C = 0 only when ``empty_ok`` (a rank's slice of the classes)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a class dimension [..., C], got a 0-d tensor")
    if x.shape[-1] == 0 and not empty_ok:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two operands of one op in one dtype, the wider of the two: each keeps every digit it
    was given (a float32 teacher is never rounded to a bfloat16 student's precision, and a
    finite float32 value never overflows float16). Autograd casts the gradient back."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def as_rows(x: Tensor) -> Tensor:
    """[..., C] -> [N, C] with unit stride along C, as the kernels read it (a view when possible)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def class_labels(name: str, labels, logits_name: str, x: Tensor) -> Tensor:
    """Integer labels of shape x.shape[:-1] on x's device, as int64 (their range is checked
    where they are read: by the kernels, or by ``labels_in_range`` for the reference)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {labels.dtype}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(x.shape[:-1])} to match {logits_name} {tuple(x.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != x.device:
        raise ValueError(f"{name} is on {labels.device} but {logits_name} is on {x.device}")
    return labels.long()


def no_bad_values(bad: Tensor, message: str, values: Optional[Tensor] = None) -> None:
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


def labels_in_range(name: str, labels: Tensor, n_classes: int, ignore_index: int) -> None:
    """Each label in [0, C) or equal to ignore_index (the reference backend's check; the
    kernels check the labels they read)."""
    bad = ((labels < 0) | (labels >= n_classes)) & (labels != ignore_index)
    no_bad_values(bad, f"{name} must be in [0, {n_classes}) or equal ignore_index={ignore_index}", labels)


def rows_defined(rows: Tensor, what: str) -> None:
    """The reference's check of what the kernels check in place: a row whose softmax is
    undefined (entirely -inf, or holding NaN) gives NaN, which becomes an error."""
    no_bad_values(torch.isnan(rows), f"{what}: a row is entirely -inf, or holds +inf or NaN, so its softmax is undefined")


def sparse_teacher(indices, logprobs, mask, logits_name: str, x: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """A teacher given at K entries per row of the logits ``x`` [..., V]: ``teacher_indices``
    [..., K] integer, ``teacher_logprobs`` [..., K] floating and ``teacher_mask`` [..., K]
    bool or integer (nonzero = provided) or None, on x's device, as [N, K] rows (int64
    indices, bool mask; the indices' range is checked where they are read)."""
    for name, t in (("teacher_indices", indices), ("teacher_logprobs", logprobs), ("teacher_mask", mask)):
        if t is None and name == "teacher_mask":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"{name} must have shape {tuple(x.shape[:-1])} + (K,) to match {logits_name} "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {logits_name} is on {x.device}")
    if indices.dtype not in INT_DTYPES:
        raise TypeError(f"teacher_indices must be an integer tensor (int64 or int32), got {indices.dtype}")
    if indices.shape[-1] == 0:
        raise ValueError(f"teacher_indices must have at least one entry per row, got shape {tuple(indices.shape)}")
    if logprobs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_logprobs must be float32, bfloat16, float16 or float64, got {logprobs.dtype}")
    same_shape("teacher_logprobs", logprobs, "teacher_indices", indices)
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype not in INT_DTYPES:
            raise TypeError(f"teacher_mask must be a bool (or 0/1 integer) tensor, got {mask.dtype}")
        same_shape("teacher_mask", mask, "teacher_indices", indices)
        mask = as_rows(mask if mask.dtype == torch.bool else mask != 0)
    return as_rows(indices.long()), as_rows(logprobs.detach()), mask
