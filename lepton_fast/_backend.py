"""Which kernel runs each op: the op table, the kernels registered where the compiled
extension has none, and forcing one.

Every op has one schema, ``torch.ops.lepton_fast.<op>``, defined by :func:`define` beside its
public function (lepton_fast/ops/<family>.py) together with its fake kernel. Every
implementation is a kernel of that schema, registered under a dispatcher key:

| key      | with lepton_fast._C                                 | without it                         |
| CPU      | CPU C++ (csrc/cpu)                                  | reference kernel (ops/_reference)  |
| CUDA     | CUDA C++ (csrc/cuda); Triton (kernels/) when the    | Triton; the reference kernel when  |
|          | extension was built without CUDA                    | triton is not installed            |
| Autograd | C++ (csrc/autograd.cpp)                             | Python (ops/_autograd.py)          |

"Without it" is a pure-Python install (LEPTON_FAST_SKIP_EXT=1, the py3-none-any wheel), or a
build that does not match the running torch (lepton_fast._extension). lepton_fast/__init__.py
imports the op families (the schemas), then calls :func:`load_kernels` once: the extension's
static registrations, then the Python kernels under every key it left empty.

The dispatcher picks the kernel, so the default path has no Python between the public
function and the kernel. ``$LEPTON_FAST_BACKEND=reference|cpu|cuda|triton`` or an op's
``backend=`` keyword forces one (for tests, benchmarks and debugging): where another kernel
holds the device key, the forced one (Triton or the reference kernel) is swapped in for the
duration of the call (a dispatcher registration, so forcing is eager-only and not
thread-safe); a forced backend that cannot run is an error that says why.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from lepton_fast._extension import build_record, extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "LEPTON_FAST_BACKEND"
LIBRARY = "lepton_fast"
DEVICE_TYPES = ("cpu", "cuda")  # the device keys lepton_fast registers kernels under

# Every schema of the library: one DEF library, as a C++ TORCH_LIBRARY block would be.
_DEFINITIONS = torch.library.Library(LIBRARY, "DEF")


@dataclass(frozen=True, eq=False)  # one object per op: identity is equality, and hashing is free
class OpSpec:
    """An op as the dispatcher table sees it: ``torch.ops.lepton_fast.<name>``; the module
    ``lepton_fast.kernels.<triton>`` whose function ``<name>`` is its Triton kernel, or None;
    its reference kernel is ``lepton_fast.ops._reference.<name>``. ``public`` is False for an
    op that only other ops call. ``saves_grad``: the op returns (loss, d(loss)/d(first
    input), ...) and its autograd kernel scales that saved gradient (csrc/autograd.cpp, or
    lepton_fast/ops/_autograd.py without the extension). ``cuda_cpp``: csrc/cuda has a kernel
    of it, so a CUDA build of the extension must register one (benchmarks/gpu_check.py checks);
    without one, Triton is its CUDA kernel. ``overload``: ``torch.ops.lepton_fast.<name>.default``,
    bound once (two attribute lookups a call otherwise)."""

    name: str
    triton: Optional[str]
    public: bool = True
    saves_grad: bool = False
    cuda_cpp: bool = True
    overload: Optional[torch._ops.OpOverload] = field(default=None, repr=False)

    @property
    def qualname(self) -> str:
        return f"{LIBRARY}::{self.name}"


OPS: dict[str, OpSpec] = {}


def define(schema: str, *, triton: Optional[str] = None, public: bool = True, saves_grad: bool = False,
           cuda_cpp: bool = True) -> OpSpec:
    """Define the op ``schema`` ("name(Tensor x, ...) -> ...", the C++ kernels' signature) and
    enter it in the table. Called at import by lepton_fast/ops/<family>.py, before
    :func:`load_kernels`."""
    name = schema.split("(", 1)[0]
    _DEFINITIONS.define(schema)
    spec = OpSpec(name, triton, public, saves_grad, cuda_cpp, getattr(torch.ops.lepton_fast, name).default)
    OPS[name] = spec
    return spec


# The op names whose kernel under a key is lepton_fast._C's, and those whose CUDA kernel is the
# Triton one by default; filled by load_kernels.
_NATIVE: dict[str, frozenset] = {"CPU": frozenset(), "CUDA": frozenset(), "Autograd": frozenset()}
_TRITON_DEFAULT: set = set()
_IMPLEMENTATIONS: Optional[torch.library.Library] = None  # the Python kernels registered by load_kernels


@functools.cache
def _triton_module(name: str):
    """lepton_fast.kernels.<name>, or the reason it cannot be used. Imported on first use:
    importing triton costs seconds that a CPU-only user should not pay at `import lepton_fast`."""
    try:
        return importlib.import_module(f"lepton_fast.kernels.{name}"), None
    except ImportError as e:
        return None, f"triton is not importable ({e})"


def triton_kernel(spec: OpSpec):
    """The Triton kernel of ``spec``: a Python function with the op's schema."""
    module, why = _triton_module(spec.triton)
    if module is None:
        raise RuntimeError(f"{spec.name}: the Triton backend is unavailable: {why}")
    return getattr(module, spec.name)


def reference_kernel(spec: OpSpec):
    """The reference kernel of ``spec`` (lepton_fast/ops/_reference.py): the op's schema over
    reference.py, imported on first use."""
    return getattr(importlib.import_module("lepton_fast.ops._reference"), spec.name)


def _lazy(spec: OpSpec, kind: str, load):
    def kernel(*args):
        return load(spec)(*args)

    kernel.__name__ = f"{spec.name}_{kind}"
    return kernel


def load_kernels() -> None:
    """Load lepton_fast._C (its C++ kernels register under the schemas defined by then), then
    register a Python kernel under every key of every op that it left empty: the reference
    kernel on the CPU, Triton on CUDA (the reference kernel where triton is not installed),
    and the Python autograd kernel of the ops that save their gradient. Called once, by
    lepton_fast/__init__.py after the op families are imported."""
    global _IMPLEMENTATIONS
    if _IMPLEMENTATIONS is not None:
        return
    loaded = extension().module is not None
    for key in _NATIVE:
        _NATIVE[key] = frozenset(name for name, spec in OPS.items()
                                 if loaded and torch._C._dispatch_has_kernel_for_dispatch_key(spec.qualname, key))
    _IMPLEMENTATIONS = torch.library.Library(LIBRARY, "IMPL")
    has_triton = importlib.util.find_spec("triton") is not None  # without importing it
    from lepton_fast.ops import _autograd

    for name, spec in OPS.items():
        if name not in _NATIVE["CPU"]:
            _IMPLEMENTATIONS.impl(name, _lazy(spec, "reference", reference_kernel), "CPU")
        if name not in _NATIVE["CUDA"]:
            if spec.triton is not None and has_triton:
                _IMPLEMENTATIONS.impl(name, _lazy(spec, "triton", triton_kernel), "CUDA")
                _TRITON_DEFAULT.add(name)
            else:
                _IMPLEMENTATIONS.impl(name, _lazy(spec, "reference", reference_kernel), "CUDA")
        if spec.saves_grad and name not in _NATIVE["Autograd"]:
            _autograd.register_saved_gradient(spec)


def autograd_kernel(spec: OpSpec) -> Optional[str]:
    """Where ``spec``'s autograd kernel comes from ("C++" or "Python"), None without one."""
    if not spec.saves_grad:
        return None
    return "C++" if spec.name in _NATIVE["Autograd"] else "Python"


def unavailable(spec: OpSpec, backend: str, device_type: str) -> str | None:
    """None when ``backend`` can run ``spec`` on ``device_type`` tensors, else why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device_type not in DEVICE_TYPES:
        return f"lepton_fast's kernels take cpu or cuda tensors, got {device_type} tensors"
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend} backend takes {backend} tensors, got {device_type} tensors"
        if spec.name in _NATIVE[backend.upper()]:
            return None
        status = extension()
        if status.module is None:
            return f"the extension lepton_fast._C is not loaded: {status.reason}"
        if backend == "cuda" and not build_record().get("cuda"):
            # Older build records do not say why.
            why = build_record().get("no_cuda_because") or "a CPU-only torch, no nvcc, or no GPU at build time"
            return f"lepton_fast._C was built without CUDA ({why})"
        return f"lepton_fast._C was built without a {backend} kernel for {spec.name}"
    if spec.triton is None:
        return f"{spec.name} has no Triton kernel"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    return _triton_module(spec.triton)[1]


@functools.cache
def default(spec: OpSpec, device_type: str) -> str:
    """The backend the dispatcher runs for ``device_type`` tensors without forcing."""
    key = device_type.upper()
    if spec.name in _NATIVE.get(key, ()):
        return device_type
    return "triton" if key == "CUDA" and spec.name in _TRITON_DEFAULT else "reference"


@functools.lru_cache(maxsize=None)
def _resolved(spec: OpSpec, device_type: str, requested: Optional[str], source: str) -> str:
    if requested is None:
        return default(spec, device_type)
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {requested!r}")
    why = unavailable(spec, requested, device_type)
    if why is not None:
        raise RuntimeError(f"{spec.name}: {source}={requested!r} cannot run: {why}")
    return requested


def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result, which torch.compile calls at trace time and bakes
    the answer of into the graph, minus the import of torch._dynamo it costs (seconds of
    `import lepton_fast` for users who never compile): the mark is this attribute."""
    fn._dynamo_marked_constant = True
    return fn


def resolve(spec: OpSpec, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs ``spec`` on ``device``: ``backend`` if given, else
    $LEPTON_FAST_BACKEND if set, else the dispatcher's kernel."""
    return _resolve(spec.name, device.type, backend)


def resolve_type(spec: OpSpec, device_type: str, backend: Optional[str] = None) -> str:
    """:func:`resolve` for tensors of ``device_type`` (as :func:`device_type` gives it)."""
    return _resolve(spec.name, device_type, backend)


def device_type(x: torch.Tensor) -> str:
    """``x.device.type``, which builds its string anew on every call (2 µs, a tenth of a tiny op's
    whole call: the per-call path reads these flags instead)."""
    return "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type


# The functions torch.compile runs at trace time take names, not OpSpec objects: torch 2.11's
# dynamo cannot pass a frozen dataclass instance to them.
@_constant_under_compile
def _resolve(name: str, device_type: str, backend: Optional[str]) -> str:
    spec = OPS[name]
    if backend is not None:
        return _resolved(spec, device_type, backend, "backend")
    env = os.environ.get(ENV_BACKEND)
    if not env:
        return default(spec, device_type)
    return _resolved(spec, device_type, env, f"${ENV_BACKEND}")


@_constant_under_compile
def _swapped(name: str, backend: str, device_type: str) -> bool:
    return backend != default(OPS[name], device_type)


@contextlib.contextmanager
def forced(spec: OpSpec, backend: str, device_type: str):
    """Run ``spec`` on ``backend``'s kernel inside the block (``backend`` resolved, and not the
    dispatcher's default: Triton or the reference kernel where another kernel holds the
    device key). The swap is a dispatcher registration, undone at the end of the block."""
    kernel = triton_kernel(spec) if backend == "triton" else reference_kernel(spec)
    with torch.library._scoped_library(LIBRARY, "IMPL") as lib:
        # allow_override: the key may hold a Python kernel already (the reference or Triton one
        # of a build without that C++ kernel); torch 2.11 refuses to stack a second one without it.
        lib.impl(spec.name, kernel, device_type.upper(), allow_override=True)
        yield


@contextlib.contextmanager
def running(spec: OpSpec, backend: str, device_type: str):
    """Inside the block, ``spec``'s op runs ``backend``'s kernel on ``device_type`` tensors
    (``backend`` as :func:`resolve` chose it), for callers that reach the op through another
    (fused_linear_kd_loss calls fused_kd_loss per chunk)."""
    if not _swapped(spec.name, backend, device_type):
        yield
        return
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{spec.name}: forcing backend {backend!r} is eager-only (it swaps a dispatcher registration); under "
            "torch.compile the default kernel runs"
        )
    with forced(spec, backend, device_type):
        yield


# What torch says when a torch.func transform that differentiates (grad, vjp, jacrev, ...) meets
# the op's autograd kernel: the C++ one (csrc/autograd.cpp) or, without the extension, the
# Python one (ops/_autograd.py). Neither names the op or what to do instead.
_FUNCTORCH_REFUSALS = ("cannot use C++ torch::autograd::Function with functorch transforms",
                       "In order to use an autograd.Function with functorch transforms")


def call(spec: OpSpec, backend: str, device_type: str, *args):
    """``torch.ops.lepton_fast.<op>(*args)`` on ``backend``'s kernel (as :func:`resolve` chose it)."""
    op = spec.overload
    try:
        if not _swapped(spec.name, backend, device_type):  # the common case, without a context manager
            return op(*args)
        with running(spec, backend, device_type):
            return op(*args)
    except RuntimeError as e:
        if not any(refusal in str(e) for refusal in _FUNCTORCH_REFUSALS):
            raise
        raise RuntimeError(
            f"{spec.name}: torch.func's grad, vjp, jacrev and jacfwd cannot differentiate the fused kernel, whose "
            f"gradient is written during the forward by an autograd kernel that torch.func does not run (vmap "
            f"alone works). Use loss.backward() or torch.autograd.grad, or differentiate "
            f"lepton_fast.reference.{spec.name} (plain PyTorch) under torch.func.") from e
