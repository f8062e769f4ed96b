"""fused_pseudo_label_loss forward+backward: reference eager, torch.compile(reference), each backend.

Run: pytest benchmarks/bench_pseudo_labels.py --benchmark-only. The threshold is the median
weak-view confidence of the case's distribution, so half the rows are selected, as
mid-training; it is one number per case, so that torch.compile(reference) compiles once
(a float argument that changed every round would recompile it every round). Every variant
computes the same outputs (loss, labels, confidence, mask, class counts) and the gradient.

On a shared machine, `python benchmarks/bench_pseudo_labels.py [--threads N] [--rounds R]`
times the variants in alternating rounds instead (conftest.alternate: a load that comes and
goes reaches every variant alike), with the load average and one copy of a view as the
bandwidth reference.
Floors and measurements: benchmarks/RESULTS.md, section "fused_pseudo_label_loss".
"""
import argparse
import statistics
import sys
import time

import pytest
import torch

from conftest import Case, alternate, full_or_smoke, load_average, run_variant, variants
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


def timed(case: Case, step):
    """A callable for conftest.alternate: fresh inputs, then the seconds `step` takes on them."""
    def run():
        args, _ = case.make()
        start = time.perf_counter()
        step(args)
        return time.perf_counter() - start

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for case in CASES:
        buffer = torch.empty(case.make()[0][0].shape)
        steps = {name: (lambda a, fn=fn: case.run(fn, a, {})) for name, fn in VARIANTS.items()}
        # The bandwidth reference: one copy of a view (2 x N x C x 4 bytes moved).
        steps["copy"] = lambda a: buffer.copy_(a[0].detach())
        for step in steps.values():  # warm-up: compilation, the gradient buffer, allocator pages
            step(case.make()[0])
        print(f"{case.group}, {args.threads} threads, {args.rounds} alternating rounds, load {load_average()}")
        times = alternate({name: timed(case, step) for name, step in steps.items()}, args.rounds, log=lambda m: None)
        fused = statistics.median(times["lepton_fast[cpu]"]) if "lepton_fast[cpu]" in times else None
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = f"  {med / fused:5.2f}x fused" if fused else ""
            print(f"  {name:20s} median {med * 1e3:9.3f} ms  min {min(ts) * 1e3:9.3f} ms{ratio}")
        print(f"  load at the end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
