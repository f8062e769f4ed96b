"""Which implementation runs each op, in one place.

Every op has one schema, ``torch.ops.lepton_fast.<op>`` (csrc/ops.cpp), with its kernels
registered under the dispatcher's device keys:

| tensor device | kernel under the device key                           | without the extension |
| cpu           | CPU C++ (csrc/cpu)                                    | reference.py          |
| cuda          | CUDA C++ (csrc/cuda); Triton (kernels/) when the      | reference.py          |
|               | extension was built without CUDA                      |                       |

The dispatcher picks the kernel, so the default path has no Python between the public
function and the kernel. ``$LEPTON_FAST_BACKEND=reference|cpu|cuda|triton`` or an op's
``backend=`` keyword forces one (for tests, benchmarks and debugging): "reference" calls
reference.py instead of the op; "triton" where another kernel holds the device key swaps
the Triton kernel in for the duration of the call (a dispatcher registration, so forcing is
eager-only and not thread-safe); a forced backend that cannot run is an error that says why.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "LEPTON_FAST_BACKEND"
LIBRARY = "lepton_fast"


@dataclass(frozen=True, eq=False)  # one object per op: identity is equality, and hashing is free
class OpSpec:
    """An op as the dispatcher table sees it: ``torch.ops.lepton_fast.<name>``, and the
    module ``lepton_fast.kernels.<triton>`` whose function ``<name>`` is its Triton kernel
    (same signature as the schema), or None. ``public`` is False for an op that only other
    ops call (the fused losses' backward)."""

    name: str
    triton: Optional[str]
    public: bool = True

    @property
    def qualname(self) -> str:
        return f"{LIBRARY}::{self.name}"


OPS: dict[str, OpSpec] = {}


@dataclass(frozen=True)
class ExtensionStatus:
    module: object | None
    reason: str | None  # why module is None


def _running_build() -> dict:
    """The running torch's facts, in the build record's terms (see setup.py)."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def _describe(facts: dict) -> str:
    cuda = f"CUDA {facts['cuda']}" if facts.get("cuda") else "CPU only"
    return f"torch {facts.get('torch')} ({cuda}, cxx11 ABI {int(bool(facts.get('cxx11_abi')))})"


def _build_mismatch(record: dict, running: dict) -> str | None:
    """None when an extension built as ``record`` says can load into ``running`` torch, else
    what was expected and what was found.

    torch keeps its C++ ABI within a minor release (the wheels are labelled torch2.14 for
    that reason), CUDA keeps it within a major release; the C++ ABI flag must be equal. A
    CPU-only build loads into a CUDA torch of the same release (CUDA tensors then run the
    Triton kernels); a CUDA build needs CUDA in the running torch.
    """
    try:
        problems = []
        if _minor(record["torch"]) != _minor(running["torch"]):
            problems.append(f"torch {_minor(record['torch'])}.x")
        if record["cuda"] and not running["cuda"]:
            problems.append("a CUDA build of torch")
        elif record["cuda"] and record["cuda"].split(".")[0] != running["cuda"].split(".")[0]:
            problems.append(f"CUDA {record['cuda'].split('.')[0]}.x")
        if bool(record["cxx11_abi"]) != running["cxx11_abi"]:
            problems.append(f"_GLIBCXX_USE_CXX11_ABI={int(bool(record['cxx11_abi']))}")
    except (KeyError, TypeError, AttributeError) as e:
        return f"unreadable build record {record!r} ({e!r})"
    if not problems:
        return None
    return f"built for {_describe(record)}, needs {' and '.join(problems)}; running {_describe(running)}"


def extension_build() -> dict:
    """The build record of the installed extension (setup.py writes it), or {}."""
    try:
        from lepton_fast._build_info import BUILD_INFO
    except ImportError:
        return {}
    return BUILD_INFO


@functools.cache
def extension() -> ExtensionStatus:
    """Load lepton_fast._C (the schemas and the C++ kernels) once. A build that does not
    match the running torch is not loaded (loading it could crash the process): one
    warning, and every op runs reference.py."""
    BUILD_INFO = extension_build()
    if not BUILD_INFO:
        return ExtensionStatus(
            None, "not built (no build record: installed with LEPTON_FAST_SKIP_EXT=1, or a source tree never built)"
        )
    # Earlier setup.py versions wrote this record for LEPTON_FAST_SKIP_EXT=1 into source trees.
    if BUILD_INFO.get("extension") is False:
        return ExtensionStatus(None, "not built (LEPTON_FAST_SKIP_EXT=1)")
    mismatch = _build_mismatch(BUILD_INFO, _running_build())
    if mismatch is None:
        try:
            module = importlib.import_module("lepton_fast._C")
        except (ImportError, OSError) as e:
            mismatch = f"lepton_fast._C failed to load: {e}"
        else:
            return ExtensionStatus(module, None)
    warnings.warn(
        f"lepton_fast: compiled kernels disabled: {mismatch}. Every op falls back to the PyTorch "
        "reference. Install the lepton_fast wheel built for this torch, or build from source: pip install "
        "--no-build-isolation lepton_fast (`lepton-fast info` shows the state).",
        RuntimeWarning,
        stacklevel=2,
    )
    return ExtensionStatus(None, mismatch)


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


def _lazy_triton(spec: OpSpec):
    def kernel(*args):
        return triton_kernel(spec)(*args)

    kernel.__name__ = f"{spec.name}_triton"
    return kernel


def _native(spec: OpSpec, key: str) -> bool:
    """Whether the C++ extension registered a kernel of ``spec`` under ``key``."""
    return spec.name not in _TRITON_DEFAULT.get(key, set()) and torch._C._dispatch_has_kernel_for_dispatch_key(
        spec.qualname, key
    )


_LIBRARY: Optional[torch.library.Library] = None  # the Triton kernels registered by default
_TRITON_DEFAULT: dict[str, set] = {}


def register(name: str, *, triton: Optional[str] = None, public: bool = True) -> OpSpec:
    """Declare an op (its schema is csrc/ops.cpp's). Where the extension has no CUDA kernel for
    it (a build without CUDA) and it has a Triton kernel, that kernel becomes its CUDA kernel."""
    global _LIBRARY
    spec = OpSpec(name, triton, public)
    OPS[name] = spec
    if extension().module is not None and triton is not None and not _native(spec, "CUDA"):
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library(LIBRARY, "IMPL")
        _LIBRARY.impl(name, _lazy_triton(spec), "CUDA")
        _TRITON_DEFAULT.setdefault("CUDA", set()).add(name)
    return spec


def unavailable(spec: OpSpec, backend: str, device_type: str) -> str | None:
    """None when ``backend`` can run ``spec`` on ``device_type`` tensors, else why not."""
    if backend == "reference":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    status = extension()
    if status.module is None:
        return f"the extension lepton_fast._C is not loaded: {status.reason}"
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend} backend takes {backend} tensors, got {device_type} tensors"
        if not _native(spec, backend.upper()):
            built = extension_build()
            if backend == "cuda" and not built.get("cuda"):
                return ("lepton_fast._C was built without CUDA (a CPU-only torch, no nvcc found, or "
                        "LEPTON_FAST_SKIP_CUDA=1)")
            return f"lepton_fast._C was built without a {backend} kernel for {spec.name}"
        return None
    if spec.triton is None:
        return f"{spec.name} has no Triton kernel"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton does not run on {device_type} tensors"
    return _triton_module(spec.triton)[1]


@functools.cache
def default(spec: OpSpec, device_type: str) -> str:
    """The backend the dispatcher runs for ``device_type`` tensors without forcing."""
    key = device_type.upper()
    if extension().module is None or not torch._C._dispatch_has_kernel_for_dispatch_key(spec.qualname, key):
        return "reference"
    return "triton" if spec.name in _TRITON_DEFAULT.get(key, set()) else device_type


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
    $LEPTON_FAST_BACKEND if set, else the dispatcher's kernel (or reference.py without one)."""
    return _resolve(spec.name, device.type, backend)


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
    """Run ``spec`` on ``backend``'s kernel inside the block (``backend`` resolved, not
    "reference", and not the dispatcher's default: Triton where another kernel holds the
    device key). The swap is a dispatcher registration, undone at the end of the block."""
    with torch.library._scoped_library(LIBRARY, "IMPL") as lib:
        lib.impl(spec.name, triton_kernel(spec), device_type.upper())
        yield


def _overload(spec: OpSpec):
    # Not functools.cache: Dynamo traces through a cache wrapper with a warning to the user,
    # and torch.ops caches the attribute lookups already (0.6 µs a call).
    return getattr(torch.ops.lepton_fast, spec.name).default


@contextlib.contextmanager
def running(spec: OpSpec, backend: str, device_type: str):
    """Inside the block, ``spec``'s op runs ``backend``'s kernel on ``device_type`` tensors
    (``backend`` as :func:`resolve` chose it, not "reference"), for callers that reach the op
    through another (fused_linear_kd_loss calls fused_kd_loss per chunk)."""
    if not _swapped(spec.name, backend, device_type):
        yield
        return
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{spec.name}: forcing backend {backend!r} is eager-only (it swaps a dispatcher registration); under "
            "torch.compile the default kernel or backend='reference' run"
        )
    with forced(spec, backend, device_type):
        yield


def call(spec: OpSpec, backend: str, device_type: str, *args):
    """``torch.ops.lepton_fast.<op>(*args)`` on ``backend``'s kernel (as :func:`resolve` chose it)."""
    op = _overload(spec)
    if not _swapped(spec.name, backend, device_type):  # the common case, without a context manager
        return op(*args)
    with running(spec, backend, device_type):
        return op(*args)
