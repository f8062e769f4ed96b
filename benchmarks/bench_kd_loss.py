"""fused_kd_loss: reference eager vs torch.compile(reference) vs each lepton_fast backend.

Run: pytest benchmarks/bench_kd_loss.py --benchmark-only. On a shared machine,
`python benchmarks/bench_kd_loss.py [--threads N] [--rounds R] [--only TEXT]` times the
variants in alternating rounds instead (conftest.alternating_main), with the load average and
one copy of the student logits as the bandwidth reference.
Floors and measurements: benchmarks/RESULTS.md, section "fused_kd_loss on CPU".
"""
import sys

import pytest
import torch

from conftest import Case, alternating_main, full_or_smoke, loss_run, run_variant, variants
from lepton_fast import fused_kd_loss, reference
from lepton_fast.ops.kd_loss import SPEC

VARIANTS = variants(SPEC, reference.fused_kd_loss, fused_kd_loss)

# (N, C, dtype, keyword arguments): an LLM-sized vocabulary (the target shape), the
# same in bfloat16, and the generalized JSD (three passes, a log per element).
SHAPES = [
    (2048, 32000, torch.float32, dict(temperature=2.0)),
    (2048, 32000, torch.bfloat16, dict(temperature=2.0)),
    (512, 32000, torch.float32, dict(temperature=2.0, divergence="jsd", beta=0.5)),
]
SMOKE_SHAPE = (64, 1000)


def make_case(n, c, dtype, kw, backward):
    n, c = full_or_smoke((n, c), SMOKE_SHAPE)
    extra = "".join(f" {k}={v}" for k, v in kw.items() if k != "temperature")
    group = f"fused_kd_loss {n}x{c} T={kw['temperature']}{extra} {str(dtype).split('.')[-1]} " + (
        "fwd+bwd" if backward else "fwd"
    )

    def make():  # fresh random logits each round
        student = (torch.randn(n, c) * 3).to(dtype).requires_grad_(backward)
        teacher = (torch.randn(n, c) * 3).to(dtype)
        return (student, teacher), kw

    return Case(group, make, loss_run(backward))


CASES = [
    make_case(n, c, dtype, kw, backward)
    for (n, c, dtype, kw) in SHAPES
    for backward in (False, True)
    if backward or dtype == torch.float32 and "divergence" not in kw
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=[c.group for c in CASES])
def test_kd_loss(benchmark, case, variant):
    run_variant(benchmark, case, variant, VARIANTS[variant], rounds=5)


if __name__ == "__main__":
    sys.exit(alternating_main(CASES, VARIANTS, __doc__))
