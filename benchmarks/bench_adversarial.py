"""fgsm_perturb / pgd_step on CPU: the fused kernel vs the eager torch composition vs
torch.compile of it (reference.py is that composition, bit for bit, in float32).

    pytest benchmarks/bench_adversarial.py --benchmark-only          # 256x3x224x224 float32
    pytest benchmarks/bench_adversarial.py --benchmark-disable       # smoke run on a small shape

Floors (pure bandwidth, float32): pgd_step reads x_adv, x_orig, grad and writes the result,
16 bytes per element; fgsm_perturb 12. The eager PGD composition makes 7 passes (sign, mul,
add, sub, clamp, add, clamp) moving 68 bytes per element, fgsm 4 passes and 36 bytes.
"""
from __future__ import annotations

import pytest
import torch

import lepton_fast
from lepton_fast import _backend, reference
from lepton_fast.ops import adversarial as adv_ops

FULL_SHAPE = (256, 3, 224, 224)
SMOKE_SHAPE = (4, 3, 32, 32)
EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(scope="module")
def shape(request):
    return SMOKE_SHAPE if request.config.getoption("benchmark_disable") else FULL_SHAPE


@pytest.fixture(scope="module")
def tensors(shape):
    g = torch.Generator().manual_seed(0)
    x_orig = torch.rand(shape, generator=g)
    x_adv = (x_orig + EPS * (2 * torch.rand(shape, generator=g) - 1)).clamp_(0, 1)
    grad = torch.randn(shape, generator=g)
    return x_adv, x_orig, grad


def _variants(spec):
    # Triton runs on CPU tensors only in its interpreter: not a timing.
    return ["eager", "compiled"] + (["cpu"] if _backend.unavailable(spec, "cpu", "cpu") is None else [])


_compiled = {}


def _pgd_fn(variant):
    if variant == "eager":
        return lambda a, o, g: reference.pgd_step(a, o, g, STEP, EPS)
    if variant == "compiled":
        if "pgd" not in _compiled:
            _compiled["pgd"] = torch.compile(lambda a, o, g: reference.pgd_step(a, o, g, STEP, EPS), fullgraph=True)
        return _compiled["pgd"]
    return lambda a, o, g: lepton_fast.pgd_step(a, o, g, STEP, EPS, backend=variant)


def _fgsm_fn(variant):
    if variant == "eager":
        return lambda x, g: reference.fgsm_perturb(x, g, EPS)
    if variant == "compiled":
        if "fgsm" not in _compiled:
            _compiled["fgsm"] = torch.compile(lambda x, g: reference.fgsm_perturb(x, g, EPS), fullgraph=True)
        return _compiled["fgsm"]
    return lambda x, g: lepton_fast.fgsm_perturb(x, g, EPS, backend=variant)


def _group(op, shape):
    return f"{op} {'x'.join(map(str, shape))} float32 fwd"


@pytest.mark.parametrize("variant", _variants(adv_ops.PGD_SPEC))
def test_pgd_step(benchmark, tensors, shape, variant):
    benchmark.group = _group("pgd_step", shape)
    fn = _pgd_fn(variant)
    out = fn(*tensors)  # warm-up (and compilation)
    assert torch.equal(out, reference.pgd_step(*tensors, STEP, EPS))
    del out
    benchmark.pedantic(fn, args=tensors, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", [v for v in _variants(adv_ops.PGD_SPEC) if v not in ("eager", "compiled")])
def test_pgd_step_in_place(benchmark, tensors, shape, variant):
    """In place on x_adv, as an attack loop uses it: no new buffer to allocate and fault in."""
    benchmark.group = _group("pgd_step", shape)
    x_adv, x_orig, grad = tensors
    target = x_adv.clone()
    benchmark.pedantic(lambda: lepton_fast.pgd_step_(target, x_orig, grad, STEP, EPS, backend=variant),
                       rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", _variants(adv_ops.FGSM_SPEC))
def test_fgsm_perturb(benchmark, tensors, shape, variant):
    benchmark.group = _group("fgsm_perturb", shape)
    x, _, grad = tensors
    fn = _fgsm_fn(variant)
    assert torch.equal(fn(x, grad), reference.fgsm_perturb(x, grad, EPS))
    benchmark.pedantic(fn, args=(x, grad), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", [v for v in _variants(adv_ops.FGSM_SPEC) if v not in ("eager", "compiled")])
def test_fgsm_perturb_in_place(benchmark, tensors, shape, variant):
    benchmark.group = _group("fgsm_perturb", shape)
    x, _, grad = tensors
    target = x.clone()
    benchmark.pedantic(lambda: lepton_fast.fgsm_perturb_(target, grad, EPS, backend=variant),
                       rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("op", ["pgd_step", "fgsm_perturb"])
def test_copy_floor(benchmark, tensors, shape, op):
    """The bandwidth floor on this machine: a copy into an existing buffer moves 2 tensors;
    pgd_step must move 4 (floor = 2x this time), fgsm_perturb 3 (1.5x)."""
    benchmark.group = _group(op, shape)
    x = tensors[0]
    target = torch.empty_like(x)
    benchmark.pedantic(lambda: target.copy_(x), rounds=5, iterations=1, warmup_rounds=1)
