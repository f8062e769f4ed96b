"""One command for a CUDA machine: build, test, measure copy bandwidth, time every GPU case.

    python benchmarks/gpu_check.py [--json PATH] [--skip-build] [--skip-tests] [--only TEXT] [--dry-run]

1. Builds lepton_fast in place with the machine's own torch, nvcc and ninja
   (`pip install --no-build-isolation --no-deps --no-index -e .`, no network), for this
   GPU's arch unless TORCH_CUDA_ARCH_LIST is set, with LEPTON_FAST_FORCE_CUDA=1.
2. Runs `pytest -m cuda`.
3. Measures the device-to-device copy bandwidth (CUDA events; bytes read + written).
4. Times every variant of every case in benchmarks/gpu_cases/*.py (contract in
   benchmarks/gpu_cases/__init__.py): CUDA events around each call, median of many calls
   after a warm-up, achieved GB/s over the case's minimum traffic and its fraction of the
   copy bandwidth, and the peak memory a call adds to what was allocated before it
   (the inputs). A variant that fails is reported with its error; the run goes on.

Prints a table and writes everything as JSON to $OUT/gpu_check.json when $OUT is set, or
to --json. It keeps to a time budget (--budget, default 450 s in all): each variant times
for at most ~1 s, and cases that no longer fit are reported as skipped.

Before anything else it checks what the build and the tests need (Python, torch and its
Triton, nvcc of torch's CUDA major version, setuptools, ninja, pytest, a C++ compiler and
Python's headers) and stops, saying what is missing, rather than fail inside the build: the
GPU machine has no network to install anything. After the build it checks, in a fresh
interpreter, that the extension loads with its CUDA kernels and that every op has its CUDA
and Triton backend on CUDA tensors.

`--dry-run` proves all that on a machine without a GPU, in the GPU machine's toolchain
(Python 3.12, torch 2.11, Triton 3.6, nvcc 13; .ci/run runs it so): the same checks and the
same offline build (CPU + CUDA, for --arch, default 9.0, an H200), then, in place of running
the `cuda` tests, it collects them, compiles every Triton kernel for sm_90 and sm_80
(tests/test_triton_aot.py), and times the cases' CPU smoke shapes (Triton in its
interpreter). Any step that fails makes the exit status 1, and the last line says which.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import pkgutil
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The supported range (README "Supported versions") and what the build and the cuda tests
# import. All of it is in the GPU machines' image (device KINDS.md lists its packages;
# expecttest, in the dev extra, is not there and no test needs it).
OLDEST_PYTHON = (3, 11)
OLDEST_TORCH = (2, 11)
NEEDED = ("setuptools>=77", "ninja", "pytest>=8", "packaging", "numpy", "triton")
DRY_RUN_ARCH = "9.0"  # the GPU machines' H200


def log(msg: str) -> None:
    print(msg, flush=True)


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _major_minor(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:2])


def find_nvcc() -> str | None:
    """The nvcc the build will use: $CUDA_HOME/bin/nvcc, else the one on PATH (setup.py
    then finds its toolkit from it)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        path = os.path.join(home, "bin", "nvcc")
        return path if os.path.exists(path) else None
    return shutil.which("nvcc")


def preflight() -> dict:
    """Everything the build and the tests need, checked before either runs."""
    from importlib import metadata

    import torch
    from packaging.requirements import Requirement

    problems = []
    facts = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if sys.version_info[:2] < OLDEST_PYTHON:
        problems.append(f"Python {platform.python_version()}: lepton_fast needs Python >= "
                        f"{'.'.join(map(str, OLDEST_PYTHON))}")
    if _major_minor(torch.__version__) < OLDEST_TORCH:
        problems.append(f"torch {torch.__version__}: lepton_fast needs torch >= {'.'.join(map(str, OLDEST_TORCH))}")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build: no CUDA kernels can be built or run")
    for text in NEEDED:
        req = Requirement(text)
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (the build and tests need {text})")
            continue
        facts[req.name] = found
        if not req.specifier.contains(found, prereleases=True):
            problems.append(f"{req.name} {found} is installed, the build and tests need {text}")
    # torch pins the Triton it was built with (torch 2.11: triton==3.6.0); another one breaks
    # torch.compile and may not know this GPU.
    for text in metadata.requires("torch") or []:
        req = Requirement(text)
        if req.name == "triton" and (req.marker is None or req.marker.evaluate()) and "triton" in facts:
            if not req.specifier.contains(facts["triton"], prereleases=True):
                problems.append(f"triton {facts['triton']} is installed, torch {torch.__version__} needs {req}")
    nvcc = find_nvcc()
    if nvcc is None:
        problems.append("nvcc not found: set CUDA_HOME or put the CUDA toolkit's bin/ on PATH")
    else:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            out = ""
            problems.append(f"{nvcc} --version failed: {e}")
        release = re.search(r"release (\d+)\.(\d+)", out)
        facts["nvcc"] = f"{nvcc} {release.group(1)}.{release.group(2)}" if release else nvcc
        if release and torch.version.cuda and release.group(1) != torch.version.cuda.split(".")[0]:
            problems.append(f"nvcc {release.group(1)}.{release.group(2)} ({nvcc}) cannot build for torch "
                            f"{torch.__version__} (CUDA {torch.version.cuda}): it needs nvcc "
                            f"{torch.version.cuda.split('.')[0]}.x")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        problems.append(f"no C++ compiler ({cxx}) on PATH")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        problems.append(f"Python.h not found in {sysconfig.get_paths()['include']} (the Python headers)")
    result = {"ok": not problems, "problems": problems, "facts": facts}
    log(f"[preflight] {'ok' if not problems else 'FAILED'}: {json.dumps(facts)}")
    for p in problems:
        log(f"[preflight]   {p}")
    return result


def build(env_extra: dict, dry_run: bool = False, timeout: float = 600.0) -> dict:
    import torch

    env = dict(os.environ, **env_extra)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    # A build that quietly left CUDA out would waste the GPU run: stop instead.
    env["LEPTON_FAST_FORCE_CUDA"] = "1"
    env.pop("LEPTON_FAST_SKIP_CUDA", None)
    env.pop("LEPTON_FAST_SKIP_EXT", None)
    if "TORCH_CUDA_ARCH_LIST" not in env and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    elif "TORCH_CUDA_ARCH_LIST" not in env and dry_run:
        env["TORCH_CUDA_ARCH_LIST"] = DRY_RUN_ARCH
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    log(f"[build] {' '.join(cmd)}  (TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')}, MAX_JOBS={env['MAX_JOBS']}, "
        "LEPTON_FAST_FORCE_CUDA=1)")
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        rc, out = "timeout", out + f"\n[build timed out after {timeout:.0f} s: --build-timeout]"
    result = {"rc": rc, "seconds": round(time.time() - start, 1),
              "arch_list": env.get("TORCH_CUDA_ARCH_LIST"), "output_tail": tail(out)}
    log(f"[build] rc={rc} in {result['seconds']} s")
    if rc != 0:
        log(result["output_tail"])
    return result


# Run in a fresh interpreter, after the build: what the GPU run will find.
VERIFY_BUILD = r"""
import json, torch, lepton_fast
from lepton_fast import _backend
problems = []
status = _backend.extension()
if status.module is None:
    problems.append(f"lepton_fast._C does not load: {status.reason}")
try:
    from lepton_fast._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = {}
if BUILD_INFO.get("cuda") != torch.version.cuda:
    problems.append(f"the extension was built for CUDA {BUILD_INFO.get('cuda')}, torch has CUDA {torch.version.cuda}")
ops = {}
for name, spec in sorted(_backend.OPS.items()):
    ops[name] = {}
    # The ops with a CUDA C++ source (spec.cuda_cpp) must have that kernel; those with a Triton module, Triton.
    for backend, exists in (("cuda", spec.cuda_cpp), ("triton", spec.triton is not None)):
        why = _backend.unavailable(spec, backend, "cuda") if exists else "no such backend for this op"
        ops[name][backend] = why or "ok"
        if exists and why:
            problems.append(f"{name}: the {backend} backend cannot run on CUDA tensors: {why}")
print(json.dumps({"file": lepton_fast.__file__, "build": BUILD_INFO, "ops": ops, "problems": problems}))
"""


def verify_build() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", VERIFY_BUILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"problems": [f"the check of the build exited with {proc.returncode}: {tail(proc.stderr, 2000)}"]}
    result["ok"] = proc.returncode == 0 and not result["problems"]
    log(f"[verify] {'ok' if result['ok'] else 'FAILED'}: built {result.get('build')}")
    for p in result["problems"]:
        log(f"[verify]   {p}")
    return result


def collect_cuda_tests() -> dict:
    """What `pytest -m cuda` would run: collected, not run (no GPU)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]
    log(f"[collect] {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    ids = [line for line in proc.stdout.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]
    per_file: dict[str, int] = {}
    for test_id in ids:
        per_file[test_id.split("::")[0]] = per_file.get(test_id.split("::")[0], 0) + 1
    ok = proc.returncode == 0 and len(ids) > 0
    result = {"rc": proc.returncode, "ok": ok, "count": len(ids), "per_file": per_file,
              "output_tail": tail(proc.stdout + proc.stderr, 4000)}
    log(f"[collect] rc={proc.returncode}: {len(ids)} cuda tests {json.dumps(per_file)}")
    if not ok:
        log(result["output_tail"])
    return result


def compile_triton_ahead_of_time() -> dict:
    """Every Triton kernel compiled for sm_90 and sm_80 by this Triton (no GPU needed)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_aot.py"]
    log(f"[aot] {' '.join(cmd)}")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    counts = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    result = {"rc": proc.returncode, "ok": proc.returncode == 0, "seconds": round(time.time() - start, 1),
              "summary": counts[-1] if counts else "", "output_tail": tail(proc.stdout + proc.stderr, 4000)}
    log(f"[aot] rc={proc.returncode} in {result['seconds']} s: {result['summary']}")
    if not result["ok"]:
        log(result["output_tail"])
    return result


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run here (the dry run's CPU timings use it), or None.
    Triton 3.6's interpreter fails on numpy >= 2.4 (tests/conftest.py has the same probe)."""
    try:
        import numpy
        import torch
        import triton
        import triton.language as tl
    except ImportError as e:
        return f"cannot import {e.name}"

    @triton.jit
    def probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, 0))

    out = torch.zeros(1)
    try:
        probe[(1,)](torch.arange(10, dtype=torch.float32), out, 10, BLOCK=4)
    except Exception as e:
        if "only 0-dimensional arrays can be converted to Python scalars" in str(e):
            return (f"Triton {triton.__version__}'s interpreter cannot run on numpy {numpy.__version__}: "
                    'install "numpy<2.4" to time the Triton variants in a dry run')
        raise
    return None


def run_tests(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]
    log(f"[tests] {' '.join(cmd)}  (timeout {timeout:.0f} s)")
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f} s]", "timeout"
    lines = [line for line in out.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    result = {"rc": rc, "seconds": round(time.time() - start, 1), "summary": summary, "output_tail": tail(out, 6000)}
    log(f"[tests] rc={rc} in {result['seconds']} s: {summary}")
    if rc != 0:
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        log("\n".join(failures[:40]) or result["output_tail"])
    return result


class Timer:
    """CUDA events on a GPU, the wall clock (after a synchronise) elsewhere."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def time_once(self, fn) -> float:
        """Seconds one call of fn takes."""
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def measure(self, fn, *, min_reps=5, max_reps=50, max_seconds=1.0) -> list[float]:
        times = []
        spent = time.time()
        while len(times) < max_reps and (len(times) < min_reps or time.time() - spent < max_seconds):
            times.append(self.time_once(fn))
        return times


def copy_bandwidth(device, timer: Timer) -> dict:
    """Device-to-device copy of a large buffer: (bytes read + bytes written) / time."""
    import torch

    n_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = timer.measure(lambda: dst.copy_(src), min_reps=20, max_reps=50, max_seconds=2.0)
    median = statistics.median(times)
    gbps = 2 * n_bytes / median / 1e9
    del src, dst
    log(f"[copy] {n_bytes >> 20} MiB device-to-device: median {median * 1e3:.3f} ms -> {gbps:.0f} GB/s (read + write)")
    return {"bytes": n_bytes, "median_ms": median * 1e3, "GBps": gbps}


def discover_cases(device, only: str | None) -> tuple[list, list]:
    """(cases, errors) from every module in benchmarks/gpu_cases/."""
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # after site-packages: lepton_fast itself comes from its install
    package = importlib.import_module("benchmarks.gpu_cases")
    cases, errors = [], []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        try:
            module = importlib.import_module(f"benchmarks.gpu_cases.{info.name}")
            found = module.cases(device)
        except Exception as e:  # one broken module must not hide the others
            errors.append({"module": info.name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            log(f"[cases] {info.name}: {type(e).__name__}: {e}")
            continue
        cases += [c for c in found if only is None or only in c.name]
    return cases, errors


def time_variant(fn, device, timer: Timer) -> dict:
    import torch

    cuda = device.type == "cuda"
    fn()  # warm-up: compiles, autotunes, allocates the case's inputs
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    # A dry run (CPU smoke shapes, Triton interpreted) checks that each variant runs: one
    # timed call is enough, and keeps the run short.
    times = timer.measure(fn) if cuda else timer.measure(fn, min_reps=1, max_reps=1)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "reps": len(times),
        "peak_extra_MiB": peak / 2**20 if cuda else None,
    }


def run_cases(cases, device, timer: Timer, copy_gbps: float, deadline: float, skip=None) -> list[dict]:
    import torch

    results = []
    while cases:
        case = cases.pop(0)  # dropped after its turn, which frees its inputs
        for variant, fn in case.variants.items():
            row = {"case": case.name, "variant": variant, "min_bytes": case.min_bytes}
            if variant in (skip or {}):
                row["error"] = skip[variant]
            elif time.time() > deadline:
                row["error"] = "skipped: time budget spent"
            else:
                try:
                    row.update(time_variant(fn, device, timer))
                    gbps = case.min_bytes / (row["median_ms"] / 1e3) / 1e9
                    row["GBps"] = gbps
                    row["frac_copy"] = gbps / copy_gbps
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    row["traceback"] = traceback.format_exc()[-3000:]
            results.append(row)
            log(format_row(row))
            if device.type == "cuda":
                torch.cuda.synchronize()
        del case, fn
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


HEADER = f"{'case':<44} {'variant':<26} {'median ms':>10} {'GB/s':>8} {'of copy':>8} {'peak+ MiB':>10}"


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['case']:<44} {row['variant']:<26} {row['error']}"
    peak = "" if row["peak_extra_MiB"] is None else f"{row['peak_extra_MiB']:.0f}"
    return (f"{row['case']:<44} {row['variant']:<26} {row['median_ms']:>10.3f} {row['GBps']:>8.0f} "
            f"{row['frac_copy']:>8.1%} {peak:>10}")


def speedups(results: list[dict]) -> list[str]:
    """Per case: each variant against torch.compile(reference)."""
    lines = []
    by_case: dict[str, dict[str, float]] = {}
    for r in results:
        if "median_ms" in r:
            by_case.setdefault(r["case"], {})[r["variant"]] = r["median_ms"]
    for case, times in by_case.items():
        base = times.get("torch.compile(reference)")
        if base:
            parts = [f"{v} {base / t:.2f}x" for v, t in times.items() if v != "torch.compile(reference)"]
            lines.append(f"{case}: vs torch.compile(reference): " + ", ".join(parts))
    return lines


def machine_info(device) -> dict:
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout
        info["nvcc"] = out.strip().splitlines()[-1] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["nvcc"] = None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="where to write the results (default $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--skip-build", action="store_true", help="no checks, no build: use what is installed")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", help="time only the cases whose name contains this text")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--build-timeout", type=float, default=600.0, help="seconds for the build (default 600)")
    parser.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)  # the child of a full run
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the same checks and build (for TORCH_CUDA_ARCH_LIST, default "
                             f"{DRY_RUN_ARCH}), then collect the cuda tests, compile the Triton kernels ahead of "
                             "time and time the cases' CPU smoke shapes")
    args = parser.parse_args(argv)
    start = time.time()
    # A dry run must run every case once, however long its build took: no budget.
    deadline = start + args.budget if not args.dry_run else float("inf")
    os.chdir(ROOT)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        log("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); use --dry-run to check the harness")
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    report: dict = {"command": " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
                    "machine": machine_info(device)}
    log(f"[machine] {json.dumps(report['machine'])}")

    if not args.skip_build:
        report["preflight"] = preflight()
        if report["preflight"]["ok"]:
            report["build"] = build({}, dry_run=args.dry_run, timeout=args.build_timeout)
            if report["build"]["rc"] == 0:
                report["verify"] = verify_build()
    stopped = (not report.get("preflight", {"ok": True})["ok"]
               or (args.dry_run and report.get("build", {}).get("rc") not in (None, 0)))
    if not (stopped or args.skip_tests):
        if args.dry_run:
            report["collect"] = collect_cuda_tests()
            report["aot"] = compile_triton_ahead_of_time()
        else:
            # Leave at least half of what remains for the timings.
            report["tests"] = run_tests(timeout=max(60.0, (deadline - time.time()) * 0.5))
    if not stopped and "build" in report:
        # A fresh interpreter sees the editable install this one has just made.
        report.update(time_in_subprocess(args, deadline))
    elif not stopped:
        report.update(time_here(args, device, deadline))
    report["seconds"] = round(time.time() - start, 1)

    results = report.get("results", [])
    if not (args.quiet_summary or stopped):
        log("")
        log(f"copy bandwidth: {report.get('copy', {}).get('GBps', float('nan')):.0f} GB/s")
        log(HEADER)
        for row in results:
            log(format_row(row))
        for line in speedups(results):
            log(line)

    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        log(f"[json] {path}")
    failed = failures(report)
    if not args.quiet_summary:
        log(f"[done] {report['seconds']} s: " + (f"FAILED ({', '.join(failed)})" if failed else "ok"))
    return 1 if failed else 0


def failures(report: dict) -> list[str]:
    """The steps that failed, in order; empty when the run passed."""
    failed = [step for step in ("preflight", "verify", "collect", "aot") if report.get(step, {"ok": True})["ok"] is False]
    failed += [step for step in ("build", "tests") if report.get(step, {}).get("rc") not in (None, 0)]
    if "fatal" in report:
        failed.append("fatal: " + report["fatal"])
    if report.get("case_errors"):
        failed.append("case modules: " + ", ".join(e["module"] for e in report["case_errors"]))
    errors = [r for r in report.get("results", []) if "error" in r and not r["error"].startswith("skipped")]
    if errors:
        failed.append(f"{len(errors)} case variants")
    return failed


def time_in_subprocess(args, deadline: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timings.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--skip-build", "--skip-tests", "--quiet-summary",
               "--json", path, "--budget", str(max(30.0, deadline - time.time()))]
        if args.only:
            cmd += ["--only", args.only]
        if args.dry_run:
            cmd += ["--dry-run"]
        log(f"[timing] {' '.join(cmd)}")
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        try:
            with open(path) as f:
                child = json.load(f)
        except (OSError, ValueError) as e:
            return {"fatal": f"timing subprocess exited with {rc} and left no results ({e})"}
    return {k: v for k, v in child.items() if k in ("lepton_fast", "copy", "case_errors", "results", "fatal",
                                                    "fatal_traceback")}


def time_here(args, device, deadline: float) -> dict:
    report: dict = {}
    timer = Timer(device)
    try:
        import lepton_fast

        report["lepton_fast"] = {"version": lepton_fast.__version__, "file": lepton_fast.__file__}
        report["copy"] = copy_bandwidth(device, timer)
        cases, report["case_errors"] = discover_cases(device, args.only)
        skip = {}
        if device.type == "cpu" and (why := interpreter_problem()):
            log(f"[cases] Triton variants skipped: {why}")
            skip["triton"] = f"skipped: {why}"
        log(HEADER)
        report["results"] = run_cases(cases, device, timer, report["copy"]["GBps"], deadline, skip)
    except Exception as e:  # report what was measured so far rather than nothing
        report["fatal"] = f"{type(e).__name__}: {e}"
        report["fatal_traceback"] = traceback.format_exc()
        log(report["fatal_traceback"])
    return report


if __name__ == "__main__":
    sys.exit(main())
