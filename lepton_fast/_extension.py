"""The compiled extension lepton_fast._C: its build record and its loading.

setup.py writes the build record (lepton_fast/_build_info.py) beside the extension it builds.
Importing lepton_fast._C runs its static registrations, the C++ kernels of the op schemas that
lepton_fast/ops/*.py define (TORCH_LIBRARY_IMPL only: the extension defines no schema). A
build that does not match the running torch is not loaded (loading it could crash the
process); the ops then run the Triton kernels on CUDA tensors and the reference kernels on CPU
tensors (lepton_fast._backend).
"""
from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass

import torch


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


def build_mismatch(record: dict, running: dict) -> str | None:
    """None when an extension built as ``record`` says can load into ``running`` torch, else
    what was expected and what was found.

    torch keeps its C++ ABI within a minor release (the wheels are labelled torch2.14 for
    that reason), CUDA keeps it within a major release; the C++ ABI flag must be equal. A
    CPU-only build loads into a CUDA torch of the same release (CUDA tensors then run the
    Triton kernels); a CUDA build needs CUDA in the running torch. The build must register
    kernels only (``impl_only``): the schemas are lepton_fast/ops's.
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
        if not record.get("impl_only"):
            # An older lepton_fast's extension defines the op schemas itself: its static
            # TORCH_LIBRARY block would clash with lepton_fast/ops's, an abort, not an exception.
            problems.append("a rebuild (it defines the op schemas itself, as earlier lepton_fast builds did)")
    except (KeyError, TypeError, AttributeError) as e:
        return f"unreadable build record {record!r} ({e!r})"
    if not problems:
        return None
    return f"built for {_describe(record)}, needs {' and '.join(problems)}; running {_describe(running)}"


def build_record() -> dict:
    """The build record of the installed extension (setup.py writes it), or {}."""
    try:
        from lepton_fast._build_info import BUILD_INFO
    except ImportError:
        return {}
    return BUILD_INFO


@functools.cache
def extension() -> ExtensionStatus:
    """Load lepton_fast._C (the C++ kernels) once, after the schemas are defined. A build that
    does not match the running torch is not loaded: one warning, and the ops run their Triton
    and reference kernels."""
    record = build_record()
    if not record:
        return ExtensionStatus(
            None, "not built (no build record: installed with LEPTON_FAST_SKIP_EXT=1, or a source tree never built)"
        )
    # Earlier setup.py versions wrote this record for LEPTON_FAST_SKIP_EXT=1 into source trees.
    if record.get("extension") is False:
        return ExtensionStatus(None, "not built (LEPTON_FAST_SKIP_EXT=1)")
    mismatch = build_mismatch(record, _running_build())
    if mismatch is None:
        try:
            module = importlib.import_module("lepton_fast._C")
        except (ImportError, OSError) as e:
            mismatch = f"lepton_fast._C failed to load: {e}"
        else:
            return ExtensionStatus(module, None)
    warnings.warn(
        f"lepton_fast: compiled kernels disabled: {mismatch}. CUDA tensors run the Triton kernels, CPU tensors "
        "the PyTorch reference. Install the lepton_fast wheel built for this torch, or build from source: pip "
        "install --no-build-isolation lepton_fast (`lepton-fast info` shows the state).",
        RuntimeWarning,
        stacklevel=2,
    )
    return ExtensionStatus(None, mismatch)
