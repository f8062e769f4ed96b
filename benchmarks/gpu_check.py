"""One command for a CUDA machine: build, test, measure copy bandwidth, time every GPU case.

    python benchmarks/gpu_check.py [--json PATH] [--skip-build] [--skip-tests] [--only TEXT]

1. Builds lepton_fast in place with the machine's own torch, nvcc and ninja
   (`pip install --no-build-isolation --no-deps -e .`, no network), for this GPU's arch
   unless TORCH_CUDA_ARCH_LIST is set.
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

`--dry-run` checks the harness without a GPU: no build, no tests, the cases' CPU smoke
shapes with wall-clock timing (Triton in its interpreter).
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
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(msg, flush=True)


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def build(env_extra: dict) -> dict:
    import torch

    env = dict(os.environ, **env_extra)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    if "TORCH_CUDA_ARCH_LIST" not in env and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    log(f"[build] {' '.join(cmd)}  (TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')}, MAX_JOBS={env['MAX_JOBS']})")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    result = {"rc": proc.returncode, "seconds": round(time.time() - start, 1),
              "arch_list": env.get("TORCH_CUDA_ARCH_LIST"), "output_tail": tail(proc.stdout + proc.stderr)}
    log(f"[build] rc={proc.returncode} in {result['seconds']} s")
    if proc.returncode != 0:
        log(result["output_tail"])
    return result


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
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times = timer.measure(fn)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "reps": len(times),
        "peak_extra_MiB": peak / 2**20 if cuda else None,
    }


def run_cases(cases, device, timer: Timer, copy_gbps: float, deadline: float) -> list[dict]:
    import torch

    results = []
    while cases:
        case = cases.pop(0)  # dropped after its turn, which frees its inputs
        for variant, fn in case.variants.items():
            row = {"case": case.name, "variant": variant, "min_bytes": case.min_bytes}
            if time.time() > deadline:
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
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", help="time only the cases whose name contains this text")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)  # the child of a full run
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: skip build and tests, time the cases' CPU smoke shapes")
    args = parser.parse_args(argv)
    start = time.time()
    deadline = start + args.budget
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

    if not (args.dry_run or args.skip_build):
        report["build"] = build({})
    if not (args.dry_run or args.skip_tests):
        # Leave at least half of what remains for the timings.
        report["tests"] = run_tests(timeout=max(60.0, (deadline - time.time()) * 0.5))
    if "build" in report:
        # A fresh interpreter sees the editable install this one has just made.
        report.update(time_in_subprocess(args, deadline))
    else:
        report.update(time_here(args, device, deadline))
    report["seconds"] = round(time.time() - start, 1)

    results = report.get("results", [])
    if not args.quiet_summary:
        log("")
        log(f"copy bandwidth: {report.get('copy', {}).get('GBps', float('nan')):.0f} GB/s")
        log(HEADER)
        for row in results:
            log(format_row(row))
        for line in speedups(results):
            log(line)
        log(f"[done] {report['seconds']} s")

    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        log(f"[json] {path}")
    failed = (report.get("build", {}).get("rc") not in (None, 0) or report.get("tests", {}).get("rc") not in (None, 0)
              or "fatal" in report or any("error" in r and not r["error"].startswith("skipped") for r in results))
    return 1 if failed else 0


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
        log(HEADER)
        report["results"] = run_cases(cases, device, timer, report["copy"]["GBps"], deadline)
    except Exception as e:  # report what was measured so far rather than nothing
        report["fatal"] = f"{type(e).__name__}: {e}"
        report["fatal_traceback"] = traceback.format_exc()
        log(report["fatal_traceback"])
    return report


if __name__ == "__main__":
    sys.exit(main())
