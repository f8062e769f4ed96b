"""fused_pseudo_label_loss forward+backward: reference eager, torch.compile(reference), each backend.

Run: pytest benchmarks/bench_pseudo_labels.py --benchmark-only. Groups are
"pseudo_labels <N>x<C> <dtype> fwd+bwd". The threshold is the median weak-view confidence, so
half the rows are selected, as mid-training; every variant computes the same outputs (loss,
labels, confidence, mask, class counts) and the gradient.
"""
import pytest
import torch

from lepton_fast import _backend, fused_pseudo_label_loss, reference
from lepton_fast.ops import pseudo_labels as op

SHAPES = [(4096, 1000), (448, 10)]  # ImageNet-1k-sized batch of classes; FixMatch CIFAR-10 (7 x 64 unlabeled)
BACKENDS = [b for b in ("cpu",) if _backend.unavailable(op.LOSS_SPEC, b, "cpu") is None]


def _reference(strong, weak, threshold):
    return reference.fused_pseudo_label_loss(strong, weak, threshold)


def _variants(threshold):
    # A fresh static-shape compile per case: one shared compile would switch to dynamic
    # shapes at the second shape, which is slower and not what a training loop sees.
    compiled = torch.compile(_reference, dynamic=False)
    variants = {
        "reference": lambda s, w: _reference(s, w, threshold)[0],
        "compile(reference)": lambda s, w: compiled(s, w, threshold)[0],
    }
    for backend in BACKENDS:
        variants[backend] = lambda s, w, b=backend: fused_pseudo_label_loss(s, w, threshold, backend=b).loss
    return variants


@pytest.mark.parametrize("variant", ["reference", "compile(reference)"] + BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pseudo_label_loss_fwd_bwd(benchmark, shape, variant):
    g = torch.Generator().manual_seed(0)
    strong = torch.randn(shape, generator=g).requires_grad_()
    weak = torch.randn(shape, generator=g) * 4
    threshold = float(reference.select_pseudo_labels(weak)[1].median())
    loss_fn = _variants(threshold)[variant]

    def step():
        strong.grad = None
        loss_fn(strong, weak).backward()

    for _ in range(3):  # compile and warm caches outside the timing
        step()
    benchmark.group = f"pseudo_labels {shape[0]}x{shape[1]} float32 fwd+bwd"
    benchmark.pedantic(step, rounds=20, iterations=1)
