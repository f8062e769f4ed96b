"""Which implementation runs each op: the dispatch rules of DESIGN.md, in one place.

| tensor device | first choice                     | then                      | last         |
| cpu           | CPU C++ kernel (extension built) | -                         | reference.py |
| cuda          | CUDA C++ kernel (built w/ CUDA)  | Triton (importable)       | reference.py |

``LEPTON_FAST_BACKEND=reference|cpu|cuda|triton`` or an op's ``backend=`` keyword forces
one; a forced backend that cannot run is an error that says why.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "LEPTON_FAST_BACKEND"
_PREFERENCE = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class OpSpec:
    """An op as the dispatcher sees it.

    ``kernel`` names the C++ op ``torch.ops.lepton_fast.<kernel>`` (CPU and CUDA dispatch
    keys); ``triton`` the module ``lepton_fast.kernels.<triton>`` that launches its Triton
    kernels. Either is ``None`` while that backend does not exist for the op.
    """

    name: str
    kernel: str | None
    triton: str | None


OPS: dict[str, OpSpec] = {}


def register(name: str, *, kernel: str | None, triton: str | None) -> OpSpec:
    spec = OpSpec(name, kernel, triton)
    OPS[name] = spec
    return spec


@dataclass(frozen=True)
class ExtensionStatus:
    module: object | None
    reason: str | None  # why module is None


def _build_mismatch(info: dict) -> str | None:
    running = torch.__version__.split("+")[0]
    if info["torch"] != running:
        return f"built for torch {info['torch']}, running torch {running}"
    if info["cuda"] and torch.version.cuda is None:
        return f"built for CUDA {info['cuda']}, running a CPU-only torch"
    if info["cuda"] and info["cuda"].split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"built for CUDA {info['cuda']}, running torch for CUDA {torch.version.cuda}"
    if info["cxx11_abi"] != bool(torch._C._GLIBCXX_USE_CXX11_ABI):
        return f"built with _GLIBCXX_USE_CXX11_ABI={int(info['cxx11_abi'])}, torch uses the other ABI"
    return None


@functools.cache
def extension() -> ExtensionStatus:
    """Load lepton_fast._C once. A build that does not match the running torch is not
    loaded (loading it could crash the process): one warning, then the next backend."""
    try:
        from lepton_fast._build_info import BUILD_INFO
    except ImportError:
        return ExtensionStatus(None, "no build record (running from a source tree that was never built)")
    if not BUILD_INFO.get("extension"):
        return ExtensionStatus(None, "built with LEPTON_FAST_SKIP_EXT=1")
    mismatch = _build_mismatch(BUILD_INFO)
    if mismatch is None:
        try:
            module = importlib.import_module("lepton_fast._C")
        except ImportError as e:
            mismatch = f"lepton_fast._C failed to load: {e}"
        else:
            return ExtensionStatus(module, None)
    warnings.warn(
        f"lepton_fast: compiled kernels disabled ({mismatch}); falling back to Triton or the "
        "PyTorch reference. Reinstall lepton_fast for this torch (see `lepton-fast info`).",
        RuntimeWarning,
        stacklevel=2,
    )
    return ExtensionStatus(None, mismatch)


@functools.cache
def _triton_module(name: str):
    """lepton_fast.kernels.<name>, or the reason it cannot be used."""
    try:
        return importlib.import_module(f"lepton_fast.kernels.{name}"), None
    except ImportError as e:
        return None, f"triton is not importable ({e})"


def triton_kernels(spec: OpSpec):
    module, why = _triton_module(spec.triton)
    if module is None:
        raise RuntimeError(f"{spec.name}: the Triton backend is unavailable: {why}")
    return module


def unavailable(spec: OpSpec, backend: str, device_type: str) -> str | None:
    """None when ``backend`` can run ``spec`` on ``device_type`` tensors, else why not."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend} backend takes {backend} tensors, got {device_type} tensors"
        status = extension()
        if status.module is None:
            return f"the extension lepton_fast._C is not loaded: {status.reason}"
        if spec.kernel is None or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"lepton_fast::{spec.kernel}", backend.upper()
        ):
            return f"lepton_fast._C was built without a {backend} kernel for {spec.name}"
        return None
    if backend == "triton":
        if spec.triton is None:
            return f"{spec.name} has no Triton kernel"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return _triton_module(spec.triton)[1]
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# torch.compile calls this at trace time and bakes the answer into the graph.
@torch.compiler.assume_constant_result
def resolve(spec: OpSpec, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``spec`` on ``device``: ``backend`` if given, else
    $LEPTON_FAST_BACKEND if set, else the first available in the table above."""
    requested, source = backend, "backend="
    if requested is None and os.environ.get(ENV_BACKEND):
        requested, source = os.environ[ENV_BACKEND], f"${ENV_BACKEND}="
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
        why = unavailable(spec, requested, device.type)
        if why is not None:
            raise RuntimeError(f"{spec.name}: {source}{requested!r} cannot run: {why}")
        return requested
    for candidate in _PREFERENCE.get(device.type, ()):
        if unavailable(spec, candidate, device.type) is None:
            return candidate
    return "reference"
