"""sparse_kd_loss: reference eager vs torch.compile(reference) vs each lepton_fast backend.

Run: pytest benchmarks/bench_sparse_kd_loss.py --benchmark-only. On a shared machine,
`python benchmarks/bench_sparse_kd_loss.py [--threads N] [--rounds R] [--only TEXT]` times
the variants in alternating rounds (conftest.alternating_main), with one copy of the student
logits (one read and one write of them: the floor of a loss that writes its gradient) beside.
Targets, floors and measurements: benchmarks/RESULTS.md, section "sparse_kd_loss on CPU".
"""
import sys

import pytest
import torch

from conftest import Case, alternating_main, full_or_smoke, loss_run, run_variant, variants
from lepton_fast import reference, sparse_kd_loss
from lepton_fast.ops.sparse_kd_loss import SPEC

VARIANTS = variants(SPEC, reference.sparse_kd_loss, sparse_kd_loss)

# (N, V, K, keyword arguments): issue 22's shape, a teacher's top-64 of an LLM vocabulary,
# with each truncation (the tail reads the unlisted columns' mass in the same pass).
SHAPES = [
    (4096, 32000, 64, dict(temperature=2.0, truncation="renormalize")),
    (4096, 32000, 64, dict(temperature=2.0, truncation="tail")),
]
SMOKE_SHAPE = (64, 1000)


def make_case(n, v, k, kw, backward):
    n, v = full_or_smoke((n, v), SMOKE_SHAPE)
    group = f"sparse_kd_loss {n}x{v} K={k} {kw['truncation']} T={kw['temperature']} float32 " + (
        "fwd+bwd" if backward else "fwd")

    def make():  # fresh random logits and a teacher's top-k (distinct classes) each round
        student = (torch.randn(n, v) * 3).requires_grad_(backward)
        teacher = torch.randn(n, v) * 3
        logprobs, indices = torch.log_softmax(teacher, dim=-1).topk(k, dim=-1)
        return (student, indices, logprobs), kw

    return Case(group, make, loss_run(backward))


CASES = [make_case(n, v, k, kw, backward) for (n, v, k, kw) in SHAPES for backward in (False, True)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=[c.group for c in CASES])
def test_sparse_kd_loss(benchmark, case, variant):
    run_variant(benchmark, case, variant, VARIANTS[variant], rounds=5)


if __name__ == "__main__":
    sys.exit(alternating_main(CASES, VARIANTS, __doc__))
