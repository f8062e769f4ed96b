"""fused_pseudo_label_loss forward+backward: reference eager, torch.compile(reference), each backend.

Run: pytest benchmarks/bench_pseudo_labels.py --benchmark-only. The threshold is the median
weak-view confidence of the case's distribution, so half the rows are selected, as
mid-training; it is one number per case, so that torch.compile(reference) compiles once
(a float argument that changed every round would recompile it every round). Every variant
computes the same outputs (loss, labels, confidence, mask, class counts) and the gradient.

On a shared machine, `python benchmarks/bench_pseudo_labels.py [--threads N]` times the
variants in alternating rounds instead (wall and process CPU time, medians), with the load
average and a copy of the same size as the bandwidth reference.
Floors and measurements: benchmarks/RESULTS.md, section "fused_pseudo_label_loss".
"""
import pytest
import torch

from conftest import Case, full_or_smoke, run_variant, variants
from lepton_fast import fused_pseudo_label_loss, reference
from lepton_fast.ops.pseudo_labels import LOSS_SPEC

# An ImageNet-1k-sized batch of classes; FixMatch on CIFAR-10 (7 x 64 unlabeled rows).
SHAPES = [(4096, 1000), (448, 10)]
SMOKE_SHAPE = (64, 100)


def _reference(strong, weak, threshold):
    return reference.fused_pseudo_label_loss(strong, weak, threshold)[0]


def _fused(strong, weak, threshold, backend=None):
    return fused_pseudo_label_loss(strong, weak, threshold, backend=backend).loss


VARIANTS = variants(LOSS_SPEC, _reference, _fused)


def make_case(n, c):
    n, c = full_or_smoke((n, c), SMOKE_SHAPE)
    threshold = float(reference.select_pseudo_labels(torch.randn(n, c) * 4)[1].median())

    def make():  # fresh random views each round
        strong = torch.randn(n, c).requires_grad_()
        weak = torch.randn(n, c) * 4
        return (strong, weak, threshold), {}

    def run(fn, args, kwargs):
        fn(*args, **kwargs).backward()
        return args[0].grad

    return Case(f"fused_pseudo_label_loss {n}x{c} float32 fwd+bwd", make, run)


CASES = [make_case(n, c) for n, c in SHAPES]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=[c.group for c in CASES])
def test_pseudo_label_loss(benchmark, case, variant):
    run_variant(benchmark, case, variant, VARIANTS[variant], rounds=10)


def alternating_rounds(case: Case, rounds: int) -> dict:
    """name -> (median wall s, median process CPU s) over `rounds`, each round running every
    variant once on the same fresh inputs (so load that comes and goes hits all alike), plus
    "copy": one copy of the strong view into a buffer (2 x N x C x 4 bytes moved)."""
    import resource
    import time

    def cpu_time():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    args, _ = case.make()
    buffer = torch.empty_like(args[0])
    steps = {name: (lambda a, fn=fn: case.run(fn, a, {})) for name, fn in VARIANTS.items()}
    steps["copy"] = lambda a: buffer.copy_(a[0].detach())
    for step in steps.values():  # warm-up: compilation, the gradient buffer, allocator pages
        args[0].grad = None
        step(args)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        args, _ = case.make()
        for name, step in steps.items():
            args[0].grad = None
            t0, c0 = time.perf_counter(), cpu_time()
            step(args)
            times[name].append((time.perf_counter() - t0, cpu_time() - c0))
    return {name: tuple(sorted(t[i] for t in ts)[len(ts) // 2] for i in (0, 1)) for name, ts in times.items()}


def main():
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for case in CASES:
        load = os.getloadavg()
        result = alternating_rounds(case, args.rounds)
        print(f"{case.group}, {args.threads} threads, {args.rounds} alternating rounds, load average "
              f"{load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
        fused = result["lepton_fast[cpu]"] if "lepton_fast[cpu]" in result else None
        for name, (wall, cpu) in result.items():
            ratio = f"  {wall / fused[0]:5.2f}x fused wall" if fused else ""
            print(f"  {name:20s} wall {wall * 1e3:9.3f} ms  cpu {cpu * 1e3:9.3f} ms{ratio}")


if __name__ == "__main__":
    main()
