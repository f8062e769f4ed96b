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
    CPU-only build loads into a CUDA torch of the same release (its CUDA ops fall through
    to Triton); a CUDA build needs CUDA in the running torch.
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


@functools.cache
def extension() -> ExtensionStatus:
    """Load lepton_fast._C once. A build that does not match the running torch is not
    loaded (loading it could crash the process): one warning, then the next backend."""
    try:
        from lepton_fast._build_info import BUILD_INFO
    except ImportError:
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
        f"lepton_fast: compiled kernels disabled: {mismatch}. Falling back to Triton or the "
        "PyTorch reference. Install the lepton_fast wheel built for this torch, or build from "
        "source: pip install --no-build-isolation lepton_fast (`lepton-fast info` shows the state).",
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
