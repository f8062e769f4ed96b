"""Argument checks, in one place: every public op checks its arguments here, once, before
any kernel runs. Each error names the argument it is about.

Floating hyper-parameters (temperature, beta, eps, thresholds, ...) reach the kernels as 0-d
float64 CPU tensors, not Python floats: torch.compile specialises a custom op's float
arguments (one graph per value), while a tensor argument keeps one graph for a value that
changes every step (a curriculum, a warm-up, a schedule). Values are checked eagerly when
they are concrete and with ``torch._check`` (a guard or runtime assert) under tracing.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
from typing import Callable, NamedTuple, Optional, TypedDict, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "batchmean", "sum", "none")

# The scalar tensors of recent values: a training loop passes the same few values every
# step, and a lookup costs a tenth of a new tensor (whose cost shows at tiny shapes).
_SCALARS: dict[float, Tensor] = {}
_MAX_CACHED = 1024


def _remember(cache: dict, key, value):
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value
    return value


def _scalar_tensor(value: float) -> Tensor:
    t = _SCALARS.get(value)
    return _remember(_SCALARS, value, torch.scalar_tensor(value, dtype=torch.float64)) if t is None else t


def _checked_scalars(cache: dict, numbers: tuple, plain: bool, check) -> tuple:
    """``check()``: the 0-d tensors of the hyper-parameters ``numbers``, checked. Remembered in
    ``cache`` where ``plain`` (every number a Python float): a training loop passes the same
    ones every step, and one lookup costs less than a check each (a tenth of a tiny op's
    call). Only numbers that passed are entered. Floats alone, since a bool or an int equals a
    float key (True == 1.0) but is checked differently; never while tracing, where the checks
    return traced tensors."""
    plain = plain and not torch.compiler.is_compiling()
    scalars = cache.get(numbers) if plain else None
    if scalars is None:
        scalars = check()
        if plain:
            _remember(cache, numbers, scalars)
    return scalars


# --- Tensors the kernels cannot take: hyper-parameters that require grad, meta tensors (kernels
# helper; issue 23, items 2 and 7) ----------------------------------------------------------------


def no_grad_wanted(name: str, value) -> None:
    """ValueError if ``value`` is a tensor that requires grad while grad mode is on: the fused
    kernels take hyper-parameters (temperature, alpha, beta, label_smoothing, thresholds,
    weights, eps, step_size, clamp bounds, lambda_) as constants and compute no gradient for
    them, so a learnable one would silently stay untrained."""
    if isinstance(value, Tensor) and value.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but lepton_fast's fused ops compute no gradient for {name}: pass "
            f"{name}.detach() (or a float) to use it as a constant; to learn it, compute the loss with its "
            "plain-PyTorch definition in lepton_fast.reference, which autograd differentiates"
        )


def materialised(name: str, x: Tensor) -> Tensor:
    """ValueError for a tensor on the meta device (a shape and a dtype, no data: a model built
    under ``torch.device("meta")``); the ops compute values, so it must hold data first."""
    if x.is_meta:  # (not x.device.type: building that string costs 2 µs, a tenth of a tiny op's call)
        raise ValueError(
            f"{name} is a meta tensor (a shape and a dtype, no data), but lepton_fast's ops compute values: "
            "materialise it first (a model built on the meta device: model.to_empty(device=...), then load or "
            "initialise its weights)"
        )
    return x


def hyper(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
          hi_open: bool = False) -> Tensor:
    """A floating hyper-parameter as the kernels take it: a 0-d float64 CPU tensor.

    ``value`` is a Python number or a 0-d CPU tensor; it must be finite and lie between
    ``lo`` and ``hi`` (open ends as flagged). Raises TypeError for another type, ValueError
    for a value outside the interval or a tensor that requires grad (``no_grad_wanted``).
    """
    kind = type(value)
    if (kind is float or kind is int) and not torch.compiler.is_compiling():  # the common case, first
        inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if inside and math.isfinite(value):
            return _scalar_tensor(float(value))
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if isinstance(value, Tensor):
        no_grad_wanted(name, value)
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
    return real(name, value, 0.0, 1.0, hi_open=open_right)


def positive_finite(name: str, value) -> float:
    """A Python float > 0, for module constructors' fixed settings."""
    return real(name, value, 0.0, lo_open=True)


def zero(name: str, value, message: str) -> None:
    """ValueError(message) unless the number (or 0-d tensor) ``value`` is 0: an argument that
    needs another one to be given (alpha > 0 needs labels)."""
    if isinstance(value, Tensor) and torch.compiler.is_compiling():
        torch._assert_async(value == 0, message)
    elif isinstance(value, (torch.SymInt, torch.SymFloat)):
        # A traced number that changes between calls. No message: torch 2.11's Dynamo cannot
        # carry a message function that refers to anything outside the compiled region.
        torch._check(value == 0)
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
    materialised(name, x)
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


def constant(x: Tensor) -> Tensor:
    """``x`` as an input the op differentiates nothing for (a teacher): detached where it
    requires grad, else as it is (detach() makes a new tensor object, a cost at tiny shapes)."""
    return x.detach() if x.requires_grad else x


def as_rows(x: Tensor) -> Tensor:
    """[..., C] -> [N, C] with unit stride along C, as the kernels read it (a view when possible)."""
    if x.dim() != 2:  # N spelled out: -1 is ambiguous for C = 0 (a rank's empty slice of the classes)
        x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return x if x.is_contiguous() or x.stride(-1) == 1 else x.contiguous()  # the flag first: it costs nothing


def class_labels(name: str, labels, logits_name: str, x: Tensor) -> Tensor:
    """Integer labels of shape x.shape[:-1] on x's device, as int64 (their range is checked
    where they are read: by the kernels, or by ``labels_in_range`` for the reference)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, int16, int8 or uint8), got {labels.dtype}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(x.shape[:-1])} to match {logits_name} {tuple(x.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != x.device:
        raise ValueError(f"{name} is on {labels.device} but {logits_name} is on {x.device}")
    return labels.long()


def _raises_at_once(t: Tensor) -> bool:
    """Whether a check of ``t`` raises at once: on the CPU in eager mode. Elsewhere reading the
    values costs a host synchronisation, so the check is torch._assert_async (it raises at the
    next synchronisation instead)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def no_bad_values(bad: Tensor, message: str, values: Optional[Tensor] = None, *, first: bool = False) -> None:
    """Raise ValueError(message) if any element of the bool tensor ``bad`` is set: at once on
    the CPU in eager mode, quoting up to five offending ``values``, or with ``first`` the first
    one and where it is (``got 12 at row 2, entry 1`` of an [N, K] tensor), in the C++ kernels'
    words; elsewhere through torch._assert_async, without the values.
    """
    if _raises_at_once(bad):
        if bool(bad.any()):
            quoted = ""
            if values is not None and first:
                at = bad.nonzero()[0].tolist()
                entry = f", entry {at[1]}" if len(at) > 1 else ""
                quoted = f"; got {values[tuple(at)].item()} at row {at[0]}{entry}"
            elif values is not None:
                quoted = f"; got {values[bad][:5].tolist()}"
            raise ValueError(message + quoted)
    else:
        torch._assert_async(~bad.any(), message)


def labels_in_range(op: str, labels: Tensor, n_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Each label in [0, C) or equal to ignore_index (the reference and Triton kernels' check;
    the C++ kernels check the labels they read, count_valid_labels in csrc/common.h, with the
    same message)."""
    bad = ((labels < 0) | (labels >= n_classes)) & (labels != ignore_index)
    no_bad_values(bad, f"{op}: {name} must be in [0, {n_classes}) or equal ignore_index={ignore_index}", labels,
                  first=True)


def rows_defined(op: str, rows: Tensor, names: str) -> None:
    """ValueError where a row's loss (``rows`` [N]) is NaN: its softmax is undefined (the row
    entirely -inf, or +inf or NaN in it). The message names ``op``, the row and ``names``, the
    inputs to blame, as the C++ kernels' (check_rows_defined in csrc/common.h); off the CPU a
    device assertion, without the row."""
    bad = torch.isnan(rows)
    undefined = "is entirely -inf, or holds +inf or NaN, so its softmax is undefined"
    if _raises_at_once(bad):
        if bool(bad.any()):
            raise ValueError(f"{op}: row {int(bad.nonzero()[0, 0])} of {names} {undefined}")
    else:
        torch._assert_async(~bad.any(), f"{op}: a row of {names} {undefined}")


def slice_of_rows(op: str, student_logits: Tensor, labels: Optional[Tensor], ignore_index: int, class_offset: int,
                  n_classes: int) -> None:
    """The checks of a vocabulary-parallel slice op (the reference and Triton kernels'; the C++
    kernels make them in C++): the [N, C_r] slice lies in rows of n_classes; the labels are
    class ids of those rows."""
    width = student_logits.shape[-1]
    if not (0 <= class_offset and class_offset + width <= n_classes):
        raise ValueError(f"{op}: a slice of {width} columns at class_offset={class_offset} does not fit in "
                         f"n_classes={n_classes}")
    if labels is not None:
        labels_in_range(op, labels, n_classes, ignore_index)


def slice_columns(op: str, column: Tensor, n_local: int) -> None:
    """The checks the CPU kernels make of a sparse slice op's ``column`` [N, K]: in [-1, C_r),
    the columns >= 0 of a row distinct."""
    no_bad_values((column < -1) | (column >= n_local),
                  f"{op}: column must be in [-1, {n_local}) (a counted entry's column in the slice, or -1)")
    ordered = column.sort(-1).values
    no_bad_values((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0),
                  f"{op}: a row of column lists a column twice")


def teacher_indices_in_range(op: str, indices: Tensor, read: Tensor, n_classes: int) -> None:
    """Each sparse-teacher entry that is read (``read`` [N, K]) a class in [0, V) (the
    reference and Triton kernels' check; the C++ kernels check the entries they read, with the
    same message)."""
    no_bad_values(read & ((indices < 0) | (indices >= n_classes)),
                  f"{op}: teacher_indices must be in [0, {n_classes}) where teacher_mask is True", indices, first=True)


# --- knowledge distillation: the hyper-parameters of every KD entry point ----------------------

# The divergences by their codes (Divergence in csrc/kd_loss.h, the Triton kernels' DIV).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _divergence_code(name: str, value) -> float:
    return float(DIVERGENCES.index(choice(name, value, DIVERGENCES)))


def _flag(name: str, value) -> float:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return float(value)


class KDField(NamedTuple):
    """One entry of the KD ops' packed hyper-parameters (:data:`KD_FIELDS`)."""

    name: str  # the public keyword
    default: object
    pack: Callable  # (name, value) -> the checked entry: a float or a 0-d float64 tensor
    unpack: Callable  # the entry as a float -> the value as lepton_fast.reference's keyword takes it


# The KD hyper-parameters proper, which travel as ONE 1-D float64 CPU tensor ``hyper`` through
# every KD schema (fused_kd_loss, the kd_slice_* ops, sparse_kd_loss, the fused-linear ops), in
# this order: csrc/kd_loss.h (KDHyper, make_kd_params) reads the entries by it, the Triton
# launchers and the reference kernels by name (kd_values). A value that changes every step is
# one tensor argument, so torch.compile keeps one graph (module docstring), and a new
# hyper-parameter is one row here, not a new argument of every schema and entry point. What a
# fake kernel needs for the output shapes (reduction) and the loss contract shared with
# F.cross_entropy (labels, ignore_index, num_items_in_batch) stay arguments of their own.
KD_FIELDS = (
    KDField("temperature", 1.0, positive, float),
    KDField("divergence", "forward_kl", _divergence_code, lambda code: DIVERGENCES[int(code)]),
    KDField("beta", 0.5, unit_interval, float),
    KDField("alpha", 0.0, unit_interval, float),
    KDField("label_smoothing", 0.0, unit_interval, float),
    KDField("scale_by_t2", True, _flag, bool),
)
# The keywords of the loss contract every KD function also shares, with their defaults.
_KD_CONTRACT = {"labels": None, "ignore_index": -100, "reduction": "mean", "num_items_in_batch": None}
KD_DEFAULTS = {**{f.name: f.default for f in KD_FIELDS}, **_KD_CONTRACT}
# A call whose values are all of their defaults' types is remembered (_checked_scalars).
_PLAIN_TYPES = tuple(type(f.default) for f in KD_FIELDS)
_KD_PACKED: dict[tuple, Tensor] = {}  # the values of KD_FIELDS -> their packed tensor


def _packed(values: tuple) -> Tensor:
    def pack():
        entries = [f.pack(f.name, v) for f, v in zip(KD_FIELDS, values)]
        return torch.stack([e if isinstance(e, Tensor) else torch.full((), e, dtype=torch.float64) for e in entries])

    return _checked_scalars(_KD_PACKED, values, tuple(map(type, values)) == _PLAIN_TYPES, pack)


def kd_hyper(**values) -> Tensor:
    """The packed ``hyper`` tensor of the KD ops for ``values`` (keywords of :data:`KD_FIELDS`,
    their defaults for the others), checked: a 1-D float64 CPU tensor of len(KD_FIELDS)."""
    packed = _packed(tuple(values.pop(f.name, f.default) for f in KD_FIELDS))
    if values:
        raise TypeError(f"unknown KD hyper-parameter {next(iter(values))!r}")
    return packed


def kd_values(hyper: Tensor) -> dict:
    """The packed ``hyper`` tensor's values by name, as lepton_fast.reference's keywords take
    them (a host read without a device synchronisation: it is a CPU tensor)."""
    return {f.name: f.unpack(v) for f, v in zip(KD_FIELDS, hyper.tolist())}


class KDOptions(NamedTuple):
    """The KD keywords as the ops take them, checked (:func:`kd_options`)."""

    hyper: Tensor  # [len(KD_FIELDS)] float64 CPU: the hyper-parameters, packed (KD_FIELDS)
    labels: Optional[Tensor]  # int64 [N] (flattened) or None
    ignore_index: int
    reduction: str
    num_items: Optional[Tensor]  # 0-d float64, on the CPU or the logits' device


def num_items(value, like: Tensor) -> Optional[Tensor]:
    """num_items_in_batch as the ops take it: a number or a CPU tensor becomes a checked 0-d
    float64 CPU tensor; a 0-d tensor on ``like``'s GPU (transformers hands the count over on
    the device) stays there, read by the kernel, no sync."""
    if value is None:
        return None
    if isinstance(value, Tensor) and value.device == like.device and like.device.type != "cpu":
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(torch.float64)
    return positive("num_items_in_batch", value)


def kd_filled(op: str, kd: dict) -> dict:
    """The KD keywords ``kd`` with :data:`KD_DEFAULTS` for those not given; a TypeError naming
    the function ``op`` for a keyword that no KD function takes."""
    for name in kd:
        if name not in _KD_NAMES:
            raise TypeError(f"{op}() got an unexpected keyword argument {name!r}")
    return {**KD_DEFAULTS, **kd}


def kd_options(op: str, x_name: str, x: Tensor, /, **kd) -> KDOptions:
    """Every check of the KD keywords ``kd`` (those of :data:`KD_DEFAULTS`; the defaults for
    those not given) and of the labels of rows x.shape[:-1] of ``x_name``, for every KD
    function alike; ``op`` names the public function in a TypeError for an unknown keyword."""
    kd = kd_filled(op, kd)
    hyper = _packed(tuple([kd[name] for name in _FIELD_NAMES]))
    reduction = choice("reduction", kd["reduction"], REDUCTIONS)
    count = kd["num_items_in_batch"]
    if count is not None and reduction == "none":
        raise ValueError(
            "num_items_in_batch divides the summed loss, so it needs reduction 'mean' or 'sum', not 'none'")
    ignore_index = integer("ignore_index", kd["ignore_index"], None)
    labels = kd["labels"]
    if labels is not None:
        labels = class_labels("labels", labels, x_name, x).reshape(-1)
    else:
        zero("alpha", kd["alpha"], "alpha > 0 weights a hard-label cross-entropy, so labels are required")
    return KDOptions(hyper, labels, ignore_index, reduction, num_items(count, x))


_KD_NAMES = frozenset(KD_DEFAULTS)
_FIELD_NAMES = tuple(f.name for f in KD_FIELDS)


class KDKeywords(TypedDict, total=False):
    """The keywords every public KD function shares (fused_kd_loss, sparse_kd_loss, the
    fused-linear and vocabulary-parallel losses), the one list of them: each function takes
    them as ``**kd: Unpack[KDKeywords]`` and passes them to :func:`kd_options`, and
    :func:`kd_keywords` puts them in its signature and docstring. Their defaults are
    :data:`KD_DEFAULTS`; temperature, positional, each function names itself."""

    divergence: str
    beta: Union[float, Tensor]
    labels: Optional[Tensor]
    alpha: Union[float, Tensor]
    label_smoothing: Union[float, Tensor]
    ignore_index: int
    scale_by_t2: bool
    reduction: str
    num_items_in_batch: Optional[Union[int, Tensor]]


# Their documentation, which kd_keywords puts in each function's docstring (at "KD_KEYWORDS").
KD_KEYWORDS_DOC = """\
divergence: ``"forward_kl"`` (default), ``"reverse_kl"`` or ``"jsd"``.
beta: JSD mixture weight in [0, 1] (default 0.5); used only by ``"jsd"``.
labels: optional [...] integer hard labels (int64, int32, int16, int8 or uint8). Rows labelled
    ``ignore_index`` are left out of the loss and get zero gradient, also when
    ``alpha`` is 0.
alpha: weight in [0, 1] of the hard-label CE (default 0); > 0 needs ``labels``.
label_smoothing: in [0, 1] (default 0), for the CE term (as ``F.cross_entropy``).
ignore_index: label value that marks a row to leave out (default -100).
scale_by_t2: multiply the soft term by T² (default True: Hinton et al.; PyTorch's KD
    tutorial, torchdistill). Pass False for TRL/Liger-Kernel's unscaled loss.
reduction: ``"mean"`` (default; = ``"batchmean"``): mean over non-ignored rows of the
    per-row loss, 0 if every row is ignored; ``"sum"``: the sum of the rows' losses;
    ``"none"``: per-row loss [...], 0 at ignored rows. Unlike
    ``F.kl_div(reduction="mean")``, "mean" is per sample.
num_items_in_batch: the sum of the row losses divided by this count instead (> 0, a
    number or a 0-d tensor), as transformers and TRL do under gradient accumulation;
    not with ``reduction="none"``."""
assert set(KDKeywords.__annotations__) | {"temperature"} == _KD_NAMES, "KDKeywords and KD_DEFAULTS name the same"


def kd_keywords(fn=None, /, **notes: str):
    """Decorates a public KD function ``fn(..., *, ..., **kd: Unpack[KDKeywords])``: puts the
    shared keywords (:class:`KDKeywords`, with their defaults) in its signature in place of
    ``**kd``, first among its keyword-only parameters, so that ``help()``,
    ``inspect.signature`` and :func:`kd_hyper_parameters` see every keyword; and their
    documentation in its docstring in place of the line ``KD_KEYWORDS``, each ``notes[name]``
    (``@kd_keywords(labels="...")``) appended to that keyword's entry. No wrapper: a call
    costs nothing more, and :func:`kd_options` raises the TypeError for a keyword ``fn``
    does not take."""
    if fn is None:
        return functools.partial(kd_keywords, **notes)
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = next((i for i, p in enumerate(own) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(own))
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=KD_DEFAULTS[name],
                                annotation=getattr(annotation, "__forward_arg__", annotation))  # as fn's own: text
              for name, annotation in KDKeywords.__annotations__.items()]
    fn.__signature__ = signature.replace(parameters=own[:at] + shared + own[at:])
    entries = re.split(r"\n(?=\S)", KD_KEYWORDS_DOC)  # one per keyword, each at column 0
    for name, note in notes.items():
        k = next(k for k, entry in enumerate(entries) if entry.startswith(name + ":"))
        entries[k] += "".join("\n    " + line for line in inspect.cleandoc(note).splitlines())
    splice_doc(fn, "KD_KEYWORDS", "\n".join(entries))
    return fn


def splice_doc(fn, marker: str, text: str) -> None:
    """Puts ``text`` (lines at column 0, continuations indented relative to it) in ``fn``'s
    docstring in place of the one line that is ``marker`` alone, at that line's indent. A
    whole-line marker, not a ``str.replace`` of a ``{name}`` field, which would also hit the
    same characters in the docstring's LaTeX (``\\mathrm{clamp}``)."""
    if fn.__doc__ is None:  # python -OO
        return
    lines = fn.__doc__.splitlines()
    at = [k for k, line in enumerate(lines) if line.strip() == marker]
    if len(at) != 1:
        raise AssertionError(f"{fn.__qualname__}'s docstring has {len(at)} '{marker}' lines, not 1")
    indent = lines[at[0]][: len(lines[at[0]]) - len(lines[at[0]].lstrip())]
    lines[at[0]:at[0] + 1] = [indent + line for line in text.splitlines()]
    fn.__doc__ = "\n".join(lines)


def kd_hyper_parameters(fn, /, **given) -> None:
    """The checks of a KD function's hyper-parameters before any batch is seen (KDLoss's
    construction, the TRL layer): ``given`` are keyword arguments of ``fn`` (fused_kd_loss,
    ...; an unknown one is a TypeError), ``fn``'s defaults fill in the others, and
    :func:`kd_options` checks the KD keywords among them as at a call, on a stand-in [1, 1]
    batch with labels (the labels that a positive alpha needs are checked at each call)."""
    bound = inspect.signature(fn).bind_partial(**given)
    bound.apply_defaults()
    kd_options(fn.__name__, "logits", torch.zeros(1, 1),
               **{name: value for name, value in bound.arguments.items() if name in _KD_NAMES and name != "labels"},
               labels=torch.zeros(1, dtype=torch.long))


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
        materialised(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {logits_name} is on {x.device}")
    if indices.dtype not in INT_DTYPES:
        raise TypeError(f"teacher_indices must be an integer tensor (int64, int32, int16, int8 or uint8), got "
                        f"{indices.dtype}")
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


# --- pseudo-labels ------------------------------------------------------------------------------

_PSEUDO_LABEL_SCALARS: dict[tuple, tuple] = {}  # (threshold, temperature) -> their tensors


def pseudo_label_scalars(threshold, temperature) -> tuple[Tensor, Tensor]:
    """The threshold (in [0, 1]) and the temperature (> 0) of the pseudo-label ops, checked, as
    0-d float64 CPU tensors."""
    return _checked_scalars(_PSEUDO_LABEL_SCALARS, (threshold, temperature),
                            type(threshold) is type(temperature) is float,
                            lambda: (unit_interval("threshold", threshold), positive("temperature", temperature)))


def _per_class_or_row(name: str, value, shape: tuple, what: str, logits_name: str, x: Tensor) -> Tensor:
    """A floating tensor of ``shape`` on x's device, detached; ``what`` says the shape in words."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what} or None, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)} to match {logits_name} {tuple(x.shape)}, "
                         f"got {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but {logits_name} is on {x.device}")
    no_grad_wanted(name, value)
    return value.detach()


def class_thresholds(value, logits_name: str, x: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """Per-class thresholds [C] in [0, 1] (FlexMatch, FreeMatch), or None."""
    if value is None:
        return None
    value = _per_class_or_row("class_thresholds", value, (x.shape[-1],), "[C]", logits_name, x)
    no_bad_values(~((value >= 0) & (value <= 1)), "class_thresholds must be in [0, 1]", value)
    # Compared with the confidence in its own dtype, as the reference compares them.
    return value.to(acc).contiguous()


def row_weights(value, logits_name: str, x: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """Per-row weights [...] (one per row of the logits), finite and >= 0, flattened, or None."""
    if value is None:
        return None
    value = _per_class_or_row("weights", value, tuple(x.shape[:-1]), "[...] (one per row)", logits_name, x)
    no_bad_values(~((value >= 0) & torch.isfinite(value)), "weights must be finite and >= 0", value)
    return value.reshape(-1).to(acc).contiguous()


# --- the adversarial steps ----------------------------------------------------------------------


def float_input(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return materialised(name, x)


def floating_like(name: str, t, ref_name: str, ref: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    same_shape(name, t, ref_name, ref)
    return t


def opmath(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def step_operand(name: str, value, x: Tensor, *, non_negative: bool) -> Tensor:
    """eps, step_size or a clamp bound as the kernels take it (lepton_fast/ops/adversarial.py):
    a number (or a 0-d CPU tensor) becomes a 0-d float64 CPU tensor, checked at once; a tensor that broadcasts
    to x becomes x's opmath dtype on x's device, checked without a host sync off the CPU.

    A 1-d tensor is one value per sample ([N], viewed as [N, 1, ...]) whatever x's shape: for
    per-channel or per-feature values give a shape that broadcasts ([C, 1, 1], [1, D]).
    """
    if not isinstance(value, Tensor) or (value.dim() == 0 and value.device.type == "cpu"):
        # (the keyword shadows non_negative() here, whose bounds these are)
        return hyper(name, value, 0.0, math.inf, hi_open=True) if non_negative else hyper(name, value)
    no_grad_wanted(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a number or a floating-point tensor, got {value.dtype}")
    if value.dim() == 1 and x.dim() > 1:
        if value.shape[0] != x.shape[0]:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)}: a 1-d {name} is one value per sample and needs length "
                f"{x.shape[0]} for x of shape {tuple(x.shape)}; for one value per channel or feature give a shape "
                f"that broadcasts to x, such as [C, 1, 1] or [1, D]"
            )
        value = value.reshape((-1,) + (1,) * (x.dim() - 1))
    try:
        fits = torch.broadcast_shapes(value.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    if value.device != x.device:
        raise ValueError(
            f"{name} is on {value.device} but x is on {x.device}: move it once with .to(x.device) (a number or a "
            "0-d CPU tensor may stay on the CPU)"
        )
    value = value.detach().to(opmath(x))
    bad = ~torch.isfinite(value)
    if non_negative:
        bad |= value < 0
    no_bad_values(bad, f"{name} must be finite{' and >= 0' if non_negative else ''} everywhere", value)
    return value


def clamp_bounds(clamp, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(lo, hi) as :func:`step_operand` makes them, or (None, None) for clamp=None; lo <= hi everywhere."""
    if clamp is None:
        return None, None
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise TypeError(f"clamp must be None or a pair (min, max) of numbers or tensors, got {clamp!r}") from None
    numbers = not isinstance(lo, Tensor) and not isinstance(hi, Tensor)
    lo_t = step_operand("clamp[0]", lo, x, non_negative=False)
    hi_t = step_operand("clamp[1]", hi, x, non_negative=False)
    message = "clamp must be (min, max) with min <= max everywhere"
    if numbers and not torch.compiler.is_compiling():
        if float(lo) > float(hi):
            raise ValueError(f"{message}, got {clamp!r}")
    else:
        no_bad_values(lo_t > hi_t, message)
    return lo_t, hi_t


# --- an lm_head (fused_linear_kd_loss) ----------------------------------------------------------


def lm_head(name: str, hidden: Tensor, weight_name: str, weight, bias_name: str, bias, *, empty_ok: bool = False) -> None:
    """[..., H] hidden states, a [V, H] weight and an optional [V] bias of one model; V = 0 only
    when ``empty_ok`` (a rank's slice of a vocabulary-sharded head)."""
    if not isinstance(hidden, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"{weight_name} must be a torch.Tensor, got {type(weight).__name__}")
    for arg, t in ((name, hidden), (weight_name, weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{arg} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        materialised(arg, t)
    if hidden.dim() == 0:
        raise ValueError(f"{name} must be [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or (weight.shape[0] == 0 and not empty_ok):
        raise ValueError(f"{weight_name} must be [V, H] with H = {name}.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} is {weight.dtype} but {name} is {hidden.dtype}: the lm_head multiplies "
                        "them, so give both one dtype (autocast's cast of the hidden states, say)")
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but {name} is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != weight.shape[:1] or bias.device != weight.device:
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{bias_name} must be a [V] = [{weight.shape[0]}] tensor on {weight.device}, got {shape}")
        if not bias.is_floating_point():
            raise TypeError(f"{bias_name} must be floating, got {bias.dtype}")


def model_constant(name: str, value, *, positive: bool = False) -> float:
    """A model constant (a logit scale, a softcap) as a Python float; torch.compile
    specialises the graph on it (one graph per model, not per step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not abs(value) < math.inf or (positive and value <= 0):  # (NaN fails the first test too)
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return value


# -- settings, data and state of the modules and trainers -----------------------------------
# Python numbers that a constructor fixes once (thresholds, GradientReversal, trainers), and
# the checks that keep non-finite values out of stateful objects (thresholds, alignment,
# trainers): each refuses before any state changes, so a refused update leaves it whole.
def real(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
         hi_open: bool = False) -> float:
    """A finite Python float between ``lo`` and ``hi`` (open ends as flagged): a Python or
    NumPy number, or a one-element tensor that does not require grad (its gradient would be
    silently dropped). A bool or a string is refused, as ``float()`` would silently read
    ``True`` as 1 and ``"1"`` as 1.0.

    Raises TypeError for another type, ValueError for a value outside the interval.
    """
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(f"{name} is a fixed setting, read once as a number, so a tensor that requires grad would "
                         f"silently not be learned: pass a float")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    inside = (lo < number if lo_open else lo <= number) and (number < hi if hi_open else number <= hi)
    if not (math.isfinite(number) and inside):
        left, right = "(" if lo_open or lo == -math.inf else "[", ")" if hi_open or hi == math.inf else "]"
        interval = f"{left}{lo:g}, {hi:g}{right}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {number}")
    return number


def integer(name: str, value, minimum: Optional[int]) -> int:
    """A Python (or NumPy) int >= ``minimum`` (any int for None); not a bool, not a float that
    happens to be whole.

    Raises TypeError for another type, ValueError below ``minimum``.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__") or isinstance(value, Tensor):
        bound = "" if minimum is None else f" >= {minimum}"
        raise TypeError(f"{name} must be an int{bound}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def finite(name: str, x: Tensor, who: str, where: Optional[Tensor] = None) -> None:
    """ValueError naming ``name`` and ``who`` if the tensor ``x`` holds NaN or ±inf.

    ``where`` [N] (optional) labels the rows of ``x`` [N, ...] (a batch's sample positions):
    the error quotes those of the offending rows. Integer tensors pass (they are finite).
    """
    if not (x.is_floating_point() or x.is_complex()):
        return
    bad = ~torch.isfinite(x)
    if where is not None:
        bad = bad.reshape(x.shape[0], -1).any(1)
    at = " in the samples at these positions of the data" if where is not None else ""
    no_bad_values(bad, f"{who}: {name} holds NaN or ±inf{at}", x if where is None else where)


def defined_rows(name: str, logits: Tensor, who: str) -> None:
    """ValueError naming ``name`` and ``who`` if a row of ``logits`` [..., C] has no softmax:
    a NaN or +inf, or every entry -inf (-inf entries elsewhere are masked classes, allowed)."""
    if logits.numel() == 0:
        return
    rows = logits.detach().reshape(-1, logits.shape[-1]) if logits.dim() else logits.detach().reshape(1, 1)
    bad = torch.isnan(rows).any(-1) | torch.isposinf(rows).any(-1) | torch.isneginf(rows).all(-1)
    no_bad_values(bad, f"{who}: a row of {name} holds NaN or +inf, or is entirely -inf, so its softmax is "
                       f"undefined; the state is left as it was")


def class_indices(name: str, y: Tensor, classes: Optional[int] = None, ignore_index: Optional[int] = None) -> Tensor:
    """A trainer's labels as int64 (cross-entropy's dtype; int32 and the like are accepted),
    each a class in [0, ``classes``) or ``ignore_index``. Raises TypeError for floating,
    complex or bool labels, ValueError for a label out of range (quoting it)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} labels must be integer class indices, got {y.dtype}")
    if classes is not None:
        bad = (y < 0) | (y >= classes)
        if ignore_index is not None:
            bad &= y != ignore_index
        ignored = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        no_bad_values(bad, f"{name} labels must be classes in [0, {classes}){ignored}, as the model predicts "
                           f"{classes} classes", y)
    return y.long()


def inputs_for(name: str, x: Tensor, model: torch.nn.Module, mixed_precision: bool) -> None:
    """Floating inputs in the dtype of ``model``'s floating parameters, outside autocast
    (``mixed_precision`` False): else the first matmul fails deep inside the model with a
    dtype error that names neither the data nor the fix. Integer inputs (token ids) pass."""
    if mixed_precision or not x.is_floating_point():
        return
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    if dtypes and str(x.dtype) not in dtypes:
        raise TypeError(f"{name} inputs are {x.dtype} but the model's parameters are {', '.join(dtypes)}: convert "
                        f"the data (x.to({dtypes[0]})) or the model (model.to(dtype)); for mixed precision keep "
                        f"both float32 and pass amp='bf16' (or 'fp16' on CUDA)")
