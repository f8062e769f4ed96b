"""fgsm_perturb / pgd_step on CPU: the fused kernel vs the eager torch composition vs
torch.compile of it (reference.py is that composition, bit for bit, in float32).

    pytest benchmarks/bench_adversarial.py --benchmark-only          # 256x3x224x224
    pytest benchmarks/bench_adversarial.py --benchmark-disable       # smoke run on a small shape

Floors (pure bandwidth, float32): pgd_step reads x_adv, x_orig, grad and writes the result,
16 bytes per element; fgsm_perturb 12. The eager PGD composition makes 7 passes (sign, mul,
add, sub, clamp, add, clamp) moving 68 bytes per element, fgsm 4 passes and 36 bytes. The
"copy" variant measures the machine's floor in the same run: a copy into an existing buffer
moves 2 tensors, so pgd_step's floor is 2x its time, fgsm_perturb's 1.5x. Measurements:
benchmarks/RESULTS.md, section "Adversarial steps".
"""
from __future__ import annotations

import functools

import pytest
import torch

import lepton_fast
from conftest import Case, full_or_smoke, run_variant, variants
from lepton_fast import _backend, reference
from lepton_fast.ops.adversarial import FGSM_SPEC, PGD_SPEC

FULL_SHAPE = (256, 3, 224, 224)
SMOKE_SHAPE = (4, 3, 32, 32)
EPS, STEP = 8 / 255, 2 / 255
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


def _images(shape, dtype, normalised):
    """(x_adv, x_orig, grad), fresh each round; normalised images with their per-channel box
    and a per-sample eps (an attack on a classifier's own input space), else [0, 1] images."""
    x_orig = torch.rand(shape)
    x_adv = (x_orig + EPS * (2 * torch.rand(shape) - 1)).clamp_(0, 1)
    grad = torch.randn(shape)
    if not normalised:
        return (x_adv.to(dtype), x_orig.to(dtype), grad.to(dtype)), (STEP, EPS, (0.0, 1.0))
    x_adv, x_orig = (x_adv - MEAN) / STD, (x_orig - MEAN) / STD
    eps = torch.full((shape[0], 1, 1, 1), EPS) / STD.max()
    box = ((0 - MEAN) / STD, (1 - MEAN) / STD)
    return (x_adv.to(dtype), x_orig.to(dtype), grad.to(dtype)), (STEP, eps, box)


def _case(op, dtype, normalised):
    shape = full_or_smoke(FULL_SHAPE, SMOKE_SHAPE)
    operands = " per-channel clamp, per-sample eps" if normalised else ""
    group = f"{op} {'x'.join(map(str, shape))}{operands} {str(dtype).split('.')[-1]} fwd"

    def make():
        (x_adv, x_orig, grad), (step, eps, clamp) = _images(shape, dtype, normalised)
        if op == "fgsm_perturb":
            return (x_orig, grad, eps, clamp), {}
        return (x_adv, x_orig, grad, step, eps, clamp), {}

    def run(fn, args, kwargs):
        return fn(*args, **kwargs)

    return Case(group, make, run)


def _copy(*args):
    """The bandwidth floor's unit: the first tensor into a buffer that exists (the second)."""
    return args[1].copy_(args[0])


def _variants(spec, reference_fn, op_fn, in_place_fn):
    out = variants(spec, reference_fn, op_fn)
    if _backend.unavailable(spec, "cpu", "cpu") is None:
        # As an attack loop uses it: no new buffer to allocate and fault in.
        out["lepton_fast[cpu] in place"] = functools.partial(in_place_fn, backend="cpu")
    out["copy"] = _copy
    return out


VARIANTS = {
    "pgd_step": _variants(PGD_SPEC, reference.pgd_step, lepton_fast.pgd_step, lepton_fast.pgd_step_),
    "fgsm_perturb": _variants(FGSM_SPEC, reference.fgsm_perturb, lepton_fast.fgsm_perturb, lepton_fast.fgsm_perturb_),
}
CASES = [
    _case("pgd_step", torch.float32, False),
    _case("pgd_step", torch.float32, True),
    _case("pgd_step", torch.bfloat16, False),
    _case("fgsm_perturb", torch.float32, False),
]


@pytest.mark.parametrize("variant", list(VARIANTS["pgd_step"]))
@pytest.mark.parametrize("case", CASES, ids=[c.group for c in CASES])
def test_adversarial_step(benchmark, case, variant):
    run_variant(benchmark, case, variant, VARIANTS[case.group.split()[0]][variant], rounds=5)
