"""fused_pseudo_label_loss forward+backward: reference eager, torch.compile(reference), each backend.

Run: pytest benchmarks/bench_pseudo_labels.py --benchmark-only. The threshold is the median
weak-view confidence of the case's distribution, so half the rows are selected, as
mid-training; it is one number per case, so that torch.compile(reference) compiles once
(a float argument that changed every round would recompile it every round). Every variant
computes the same outputs (loss, labels, confidence, mask, class counts) and the gradient.

On a shared machine, `python benchmarks/bench_pseudo_labels.py [--threads N] [--rounds R] [--only TEXT]`
times the variants in alternating rounds instead (conftest.alternate: a load that comes and
goes reaches every variant alike), with the load average and one copy of a view as the
bandwidth reference.
Floors and measurements: benchmarks/RESULTS.md, section "fused_pseudo_label_loss".
"""
import sys

import pytest
import torch

from conftest import Case, alternating_main, full_or_smoke, loss_run, run_variant, variants
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

    return Case(f"fused_pseudo_label_loss {n}x{c} float32 fwd+bwd", make, loss_run(backward=True))


CASES = [make_case(n, c) for n, c in SHAPES]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=[c.group for c in CASES])
def test_pseudo_label_loss(benchmark, case, variant):
    run_variant(benchmark, case, variant, VARIANTS[variant], rounds=10)


if __name__ == "__main__":
    sys.exit(alternating_main(CASES, VARIANTS, __doc__))
