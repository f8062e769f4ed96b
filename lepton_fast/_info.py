"""`lepton-fast info`: what was built, what runs, and which backend each op picks."""
from __future__ import annotations

import os
import platform
import sys

import torch

from lepton_fast import _backend


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def info(file=None) -> dict:
    """Print (to ``file``, default stdout) and return the versions, the build record and,
    for each op and device type, the backend it uses and why the faster ones are skipped."""
    from lepton_fast.version import __version__

    try:
        from lepton_fast._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = {}
    status = _backend.extension()
    facts = {
        "lepton_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _triton_version(),
        "build": BUILD_INFO,
        "extension_loaded": status.module is not None,
        "extension_problem": status.reason,
        "backend_override": os.environ.get(_backend.ENV_BACKEND),
        "ops": {},
    }
    for name, spec in sorted(_backend.OPS.items()):
        facts["ops"][name] = {}
        for device in ("cpu", "cuda"):
            skipped = {b: _backend.unavailable(spec, b, device) for b in _backend.BACKENDS if b != "reference"}
            try:
                chosen = _backend.resolve(spec, torch.device(device))
            except (RuntimeError, ValueError) as e:
                chosen = f"error: {e}"
            facts["ops"][name][device] = {"backend": chosen, "unavailable": {b: w for b, w in skipped.items() if w}}

    out = file or sys.stdout
    print(f"lepton_fast {facts['lepton_fast']}  python {facts['python']}  torch {facts['torch']} "
          f"(CUDA {facts['torch_cuda']}, device available: {facts['cuda_available']})  triton {facts['triton']}",
          file=out)
    if BUILD_INFO.get("extension"):
        print(f"extension built for torch {BUILD_INFO['torch']}, CUDA {BUILD_INFO['cuda']}, "
              f"archs {BUILD_INFO['archs']}, cxx11 ABI {BUILD_INFO['cxx11_abi']}", file=out)
    print(f"extension loaded: {facts['extension_loaded']}"
          + (f" ({status.reason})" if status.reason else ""), file=out)
    if facts["backend_override"]:
        print(f"${_backend.ENV_BACKEND}={facts['backend_override']}", file=out)
    print(f"{'op':<24}{'cpu tensors':<16}{'cuda tensors':<16}", file=out)
    for name, per_device in facts["ops"].items():
        print(f"{name:<24}{per_device['cpu']['backend']:<16}{per_device['cuda']['backend']:<16}", file=out)
    return facts
