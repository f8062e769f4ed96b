"""Shared helpers for benchmarks/bench_<op>.py (pytest-benchmark).

A bench file builds one ``Group`` per (op, shape, dtype, pass), named "<op> <shape> <dtype>
<fwd|fwd+bwd>", with one callable per variant: the reference eager, torch.compile(reference)
and each lepton_fast backend that runs here (``variants``). ``run_variant`` times it on fresh
random inputs each round and measures the variant's peak extra memory once, untimed, with
torch.profiler's memory events; the terminal summary prints those peaks.

`pytest benchmarks --benchmark-only` times full shapes. With --benchmark-disable (CI's smoke
run) every variant runs once on the small ``smoke`` shape of its group, which is what
``full_or_smoke`` returns there.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lepton_fast import _backend  # noqa: E402

_SMOKE = False
_PEAKS: dict[str, dict[str, int]] = {}


def pytest_configure(config):
    global _SMOKE
    _SMOKE = bool(config.getoption("benchmark_disable", False))


def smoke() -> bool:
    """True under --benchmark-disable: run each case once on small inputs."""
    return _SMOKE


def full_or_smoke(full, small):
    return small if _SMOKE else full


def variants(spec, reference_fn: Callable, op_fn: Callable, device_type: str = "cpu") -> dict[str, Callable]:
    """name -> callable(*args, **kwargs) for the reference eager, torch.compile(reference) and
    every lepton_fast backend that can run ``spec`` on ``device_type`` tensors here (the
    Triton interpreter is left out: it is a correctness tool, not a contender)."""
    out = {"reference": reference_fn, "reference+compile": torch.compile(reference_fn, dynamic=False)}
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and device_type == "cpu":
            continue
        if _backend.unavailable(spec, backend, device_type) is None:
            out[f"lepton_fast[{backend}]"] = functools.partial(op_fn, backend=backend)
    return out


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while fn() runs beyond what existed before (CPU allocator events of
    torch.profiler); what fn returns counts, as the gradient buffer of a loss does."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_rss_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory while fn() runs above what was resident before it (Linux: VmHWM
    reset to VmRSS through /proc/self/clear_refs), or None where /proc does not offer that.
    It counts what the profiler's allocator events miss: buffers that native code allocates
    itself, as the CPU kernels' recycled gradient block (csrc/cpu/grad_buffer.h). Only buffers
    above glibc's mmap threshold (at most 32 MiB) leave the process when freed; smaller ones
    are reused from its heap, so at small shapes this reads near 0."""
    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = kib("VmRSS")
    except OSError:
        return None
    result = fn()
    del result
    return (kib("VmHWM") - before) * 1024


@dataclass
class Case:
    """One timed unit: make() -> fresh (args, kwargs); run(fn, args, kwargs) does the work."""

    group: str
    make: Callable[[], tuple[tuple, dict]]
    run: Callable[[Callable, tuple, dict], object]


def loss_run(backward: bool) -> Callable[[Callable, tuple, dict], object]:
    """A Case's run for a loss of the logits in args[0]: the loss, or with ``backward`` the
    gradient it leaves in args[0].grad."""
    def run(fn, args, kwargs):
        loss = fn(*args, **kwargs)
        if backward:
            loss.backward()
            return args[0].grad
        return loss
    return run


def run_variant(benchmark, case: Case, name: str, fn: Callable, rounds: int = 5):
    benchmark.group = case.group
    benchmark.name = name
    if not smoke():
        args, kwargs = case.make()
        case.run(fn, args, kwargs)  # warm-up: compilation, first-touch of allocator pages
        peak = peak_extra_bytes(lambda: case.run(fn, args, kwargs))
        del args, kwargs
        benchmark.extra_info["peak_extra_MB"] = round(peak / 2**20, 1)
        _PEAKS.setdefault(case.group, {})[name] = peak
    # setup hands each round fresh inputs, made outside the timed region.
    benchmark.pedantic(lambda a, k: case.run(fn, a, k), setup=lambda: (case.make(), {}), rounds=rounds,
                       iterations=1, warmup_rounds=0)


def pytest_terminal_summary(terminalreporter):
    if not _PEAKS:
        return
    terminalreporter.section("peak extra memory (torch.profiler CPU allocator events, MiB)")
    for group, peaks in _PEAKS.items():
        row = ", ".join(f"{name}: {bytes_ / 2**20:.1f}" for name, bytes_ in peaks.items())
        terminalreporter.write_line(f"{group}: {row}")


def load_average() -> str:
    """The 1-minute load average, as quoted next to every figure of a shared machine."""
    return f"{os.getloadavg()[0]:.1f}"


def alternate(variants: dict[str, Callable[[], object]], rounds: int, log=print) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed round by round in rotating order (round r starts
    with variant r), so that a change of the machine's load during the run reaches every
    variant alike instead of whichever ran last. Each callable makes its own fresh inputs
    outside what it times and returns the seconds its timed part took."""
    import time

    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        start = time.time()
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(variants[name]())
        log(f"round {r + 1}/{rounds}: {time.time() - start:.0f} s, load {load_average()}")
    return times


def alternating_main(cases: list[Case], variants: dict[str, Callable], doc: str, argv=None) -> int:
    """``python benchmarks/bench_<op>.py [--threads N] [--rounds R] [--only TEXT]``: each case's
    variants timed in alternating rounds (:func:`alternate`), with one copy of the first input
    as the bandwidth reference, medians and minima, each as a ratio to the CPU kernel's median,
    and the load average before and after."""
    import argparse
    import statistics
    import time

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def timed(case, step):
        def run():
            inputs, kwargs = case.make()  # fresh inputs each round, made outside the timed part
            start = time.perf_counter()
            step(inputs, kwargs)
            return time.perf_counter() - start
        return run

    for case in (c for c in cases if args.only in c.group):
        first = case.make()[0][0]
        buffer = torch.empty_like(first, requires_grad=False)
        steps = {name: (lambda a, k, fn=fn: case.run(fn, a, k)) for name, fn in variants.items()}
        steps["copy"] = lambda a, k: buffer.copy_(a[0].detach())  # 2 x numel x itemsize bytes moved
        for step in steps.values():  # warm-up: compilation, the gradient buffer, allocator pages
            step(*case.make())
        print(f"{case.group}, {args.threads} threads, {args.rounds} alternating rounds, load {load_average()}")
        times = alternate({name: timed(case, step) for name, step in steps.items()}, args.rounds, log=lambda m: None)
        fused = statistics.median(times["lepton_fast[cpu]"]) if "lepton_fast[cpu]" in times else None
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = f"  {med / fused:5.2f}x fused" if fused else ""
            print(f"  {name:20s} median {med * 1e3:9.3f} ms  min {min(ts) * 1e3:9.3f} ms{ratio}")
        print(f"  load at the end {load_average()}")
    return 0
