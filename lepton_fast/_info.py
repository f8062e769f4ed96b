"""`lepton-fast info`: what was built, what runs, and per op which kernel each dispatcher key
(CPU, CUDA, Autograd) runs, with the reason wherever a faster kernel is not the one that runs."""
from __future__ import annotations

import os
import platform
import sys

import torch

from lepton_fast import _backend, _extension

# The faster kernels, fastest first, per device: what the dispatch table would pick.
_PREFERRED = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _choice(spec, device: str, override: str | None) -> tuple[str, list[str]]:
    """The kernel ``spec`` runs on ``device`` tensors and why each faster one does not."""
    if override is not None:
        why = _backend.unavailable(spec, override, device)
        return (override, []) if why is None else ("unavailable", [f"{override}: {why}"])
    chosen = _backend.default(spec, device)
    skipped = []
    for candidate in _PREFERRED[device]:
        if candidate == chosen:
            break
        skipped.append(f"{candidate}: {_backend.unavailable(spec, candidate, device)}")
    return chosen, skipped


def info(file=None) -> dict:
    """Print (to ``file``, default stdout) and return the versions, the build record and,
    for each public op and device type, the kernel it uses and why any faster one is skipped.
    An invalid ``$LEPTON_FAST_BACKEND`` is reported once, and the table shows the defaults."""
    from lepton_fast.version import __version__

    BUILD_INFO = _extension.build_record()
    status = _extension.extension()
    override = os.environ.get(_backend.ENV_BACKEND) or None
    override_problem = None
    if override is not None and override not in _backend.BACKENDS:
        override_problem = (f"${_backend.ENV_BACKEND}={override!r} is not a backend (one of "
                            f"{', '.join(_backend.BACKENDS)}); it is ignored below, and every op call raises")
        override = None
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
        # Threads a CPU kernel's at::parallel_for really runs on (1 for a build without OpenMP).
        "cpu_kernel_threads": status.module.parallel_threads() if status.module is not None else None,
        "backend_override": os.environ.get(_backend.ENV_BACKEND),
        "backend_override_problem": override_problem,
        "ops": {},
    }
    for name, spec in sorted(_backend.OPS.items()):
        if not spec.public:
            continue
        facts["ops"][name] = {}
        for device in _backend.DEVICE_TYPES:
            chosen, skipped = _choice(spec, device, override)
            facts["ops"][name][device] = {"backend": chosen, "skipped": skipped}
        facts["ops"][name]["autograd"] = _backend.autograd_kernel(spec)

    out = file or sys.stdout
    print(f"lepton_fast {facts['lepton_fast']}  python {facts['python']}  torch {facts['torch']} "
          f"(CUDA {facts['torch_cuda']}, device available: {facts['cuda_available']})  triton {facts['triton']}",
          file=out)
    if BUILD_INFO.get("extension"):
        print(f"extension built for torch {BUILD_INFO['torch']}, CUDA {BUILD_INFO['cuda']}, "
              f"archs {BUILD_INFO['archs']}, cxx11 ABI {BUILD_INFO['cxx11_abi']}", file=out)
    print(f"extension loaded: {facts['extension_loaded']}" + (f" ({status.reason})" if status.reason else ""),
          file=out)
    if facts["cpu_kernel_threads"] is not None:
        threads = torch.get_num_threads()
        print(f"CPU kernels run on {facts['cpu_kernel_threads']} of torch's {threads} threads"
              + (" (the extension was built without OpenMP: rebuild it with -fopenmp)"
                 if facts["cpu_kernel_threads"] < threads else ""), file=out)
    if override_problem:
        print(override_problem, file=out)
    elif override:
        print(f"${_backend.ENV_BACKEND}={override}: every op is forced to it", file=out)
    width = max([len("op")] + [len(n) for n in facts["ops"]]) + 2
    print(f"{'op':<{width}}{'cpu tensors':<14}{'cuda tensors':<14}{'autograd':<10}", file=out)
    reasons: dict[str, set] = {}
    for name, per_key in facts["ops"].items():
        print(f"{name:<{width}}{per_key['cpu']['backend']:<14}{per_key['cuda']['backend']:<14}"
              f"{per_key['autograd'] or '-':<10}", file=out)
        for device in _backend.DEVICE_TYPES:
            for why in per_key[device]["skipped"]:
                reasons.setdefault(why, set()).add(device)
    for why, devices in reasons.items():
        print(f"  not used on {' or '.join(sorted(devices))} tensors: {why}", file=out)
    return facts
