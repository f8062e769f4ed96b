"""pgd_step / pgd_step_: one fused L-inf PGD step, bit-equal to the eager torch composition."""
import pytest
import torch

import lepton_fast
from lepton_fast import reference
from lepton_fast.ops import adversarial as adv_ops
from conftest import compiled_backends

BACKENDS = ["reference"] + compiled_backends(adv_ops.PGD_SPEC, "cpu")
LOW = (torch.bfloat16, torch.float16)

SHAPES = {
    "one-element": (1,),
    "odd-tail": (3, 5, 7),  # 105 elements: not a multiple of any vector width
    "images": (4, 3, 16, 16),
    "features": (6, 37),  # a per-sample run that is not a multiple of the vector width
}


def composition(x_adv, x_orig, grad, step, eps, clamp=(0.0, 1.0)):
    """torchattacks' PGD step, in float32 for low-precision inputs, rounded once."""
    dt = x_adv.dtype
    a, o = (x_adv.float(), x_orig.float()) if dt in LOW else (x_adv, x_orig)
    shape = (-1,) + (1,) * (a.dim() - 1)
    step = step.to(a.dtype).reshape(shape) if isinstance(step, torch.Tensor) else step
    eps = eps.to(a.dtype).reshape(shape) if isinstance(eps, torch.Tensor) else eps
    a = a + step * grad.sign().to(a.dtype)
    delta = torch.clamp(a - o, min=-eps, max=eps)
    out = o + delta
    if clamp is not None:
        out = torch.clamp(out, *clamp)
    return out.to(dt)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_orig = torch.rand(shape, generator=g, dtype=torch.float64)
    x_adv = (x_orig + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::7] = 0.0  # sign(0) = 0
    return x_adv.to(dtype), x_orig.to(dtype), grad.to(dtype)


def assert_matches(out, expected, backend):
    if backend == "triton" and out.dtype == torch.bfloat16 and out.device.type == "cpu":
        # Triton's interpreter rounds float32 -> bfloat16 by truncation (the GPU rounds to
        # nearest even), so it may be one bfloat16 ulp off on CPU tensors.
        ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp(min=1.0)
        assert ((out.float() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(out, expected), (out - expected).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_composition(backend, dtype, shape):
    x_adv, x_orig, grad = inputs(shape, dtype)
    for step, eps in [(0.01, 0.03), (2 / 255, 8 / 255)]:
        out = lepton_fast.pgd_step(x_adv, x_orig, grad, step, eps, backend=backend)
        assert out.dtype == dtype and out.shape == x_adv.shape
        assert_matches(out, composition(x_adv, x_orig, grad, step, eps), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_sample_tensors_and_no_clamp(backend, dtype):
    x_adv, x_orig, grad = inputs((5, 3, 7), dtype, seed=1)
    x_adv, x_orig = x_adv * 4 - 2, x_orig * 4 - 2  # features: not in [0, 1]
    g = torch.Generator().manual_seed(2)
    eps = torch.rand(5, generator=g) * 0.2
    step = torch.rand(5, generator=g) * 0.1
    for s, e in [(step, eps), (0.05, eps), (step, 0.1), (step, torch.tensor(0.1))]:
        out = lepton_fast.pgd_step(x_adv, x_orig, grad, s, e, clamp=None, backend=backend)
        assert_matches(out, composition(x_adv, x_orig, grad, s, e, clamp=None), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_float64_reference(backend):
    x_adv, x_orig, grad = inputs((4, 3, 8, 8), torch.float64, seed=3)
    expected = reference.pgd_step(x_adv, x_orig, grad, 0.01, 0.03)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = lepton_fast.pgd_step(x_adv.to(dtype), x_orig.to(dtype), grad.to(dtype), 0.01, 0.03, backend=backend)
        ref_low = reference.pgd_step(x_adv.to(dtype), x_orig.to(dtype), grad.to(dtype), 0.01, 0.03)
        ref_err = (ref_low.double() - expected).abs().max()
        tol = 1e-6 if dtype == torch.float32 else 2 * ref_err
        assert (out.double() - expected).abs().max() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariants(backend):
    x_adv, x_orig, grad = inputs((8, 3, 8, 8), torch.float32, seed=4)
    x_adv = lepton_fast.pgd_step(x_adv, x_orig, grad, 0.0, 8 / 255, backend=backend)  # project the start
    eps = 8 / 255
    for i in range(5):
        grad = torch.randn(x_adv.shape, generator=torch.Generator().manual_seed(10 + i))
        x_adv = lepton_fast.pgd_step(x_adv, x_orig, grad, 2.5 * eps / 4, eps, backend=backend)
        # the projection holds up to the rounding of x_orig + delta (half an ulp of 1)
        assert (x_adv.double() - x_orig.double()).abs().max() <= eps + 2 ** -24
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    same = lepton_fast.pgd_step(x_adv, x_orig, torch.zeros_like(grad), 0.1, 1.0, backend=backend)
    assert torch.equal(same, x_adv)  # sign(0) = 0 and a projection that does not bind
    at_orig = lepton_fast.pgd_step(x_adv, x_orig, grad, 0.1, 0.0, backend=backend)
    assert torch.equal(at_orig, x_orig)  # eps = 0 gives back the clean input


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_denormal_gradients(backend):
    x_adv, x_orig, grad = inputs((2, 8), torch.float32, seed=5)
    grad[0, 0], grad[0, 1], grad[1, 0] = float("nan"), 1e-40, -1e-42  # NaN and two denormals
    out = lepton_fast.pgd_step(x_adv, x_orig, grad, 0.01, 0.5, clamp=None, backend=backend)
    assert torch.equal(out, composition(x_adv, x_orig, grad, 0.01, 0.5, clamp=None))
    assert out[0, 0] == x_adv[0, 0] and out[0, 1] == x_adv[0, 1] + 0.01 and out[1, 0] == x_adv[1, 0] - 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mixed_grad_dtype(backend):
    x_adv, x_orig, grad = inputs((6, 10), torch.float32, seed=6)
    out = lepton_fast.pgd_step(x_adv.t(), x_orig.t(), grad.t(), 0.01, 0.03, backend=backend)
    assert torch.equal(out, composition(x_adv, x_orig, grad, 0.01, 0.03).t())
    # a float32 gradient too small for float16 keeps its sign
    tiny = torch.full((6, 10), 1e-9)
    out16 = lepton_fast.pgd_step(x_adv.half(), x_orig.half(), tiny, 0.01, 0.03, backend=backend)
    assert torch.equal(out16, composition(x_adv.half(), x_orig.half(), tiny, 0.01, 0.03))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_in_place(backend, layout):
    x_adv, x_orig, grad = inputs((6, 10), torch.float32, seed=7)
    expected = composition(x_adv, x_orig, grad, 0.01, 0.03)
    target = x_adv.clone() if layout == "contiguous" else x_adv.t().contiguous().t()
    ptr = target.data_ptr()
    result = lepton_fast.pgd_step_(target, x_orig, grad, 0.01, 0.03, backend=backend)
    assert result is target and target.data_ptr() == ptr
    assert torch.equal(target, expected)


def test_result_has_no_graph():
    x_adv, x_orig, grad = inputs((2, 3), torch.float32)
    out = lepton_fast.pgd_step(x_adv.requires_grad_(), x_orig, grad, 0.01, 0.03)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_opcheck(backend):
    x_adv, x_orig, grad = inputs((3, 4, 5), torch.float32)
    eps = torch.rand(3) * 0.1
    for args in [
        (x_adv, x_orig, grad, 0.01, None, 0.03, None, 0.0, 1.0, backend),
        (x_adv, x_orig, grad, 0.01, eps, 0.03, eps, None, None, backend),
    ]:
        torch.library.opcheck(torch.ops.lepton_fast.pgd_step.default, args)
        torch.library.opcheck(torch.ops.lepton_fast.pgd_step_.default, (args[0].clone(),) + args[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x_adv, x_orig, grad = inputs((4, 3, 5), torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, o, g, eps):
        out = lepton_fast.pgd_step(a, o, g, 0.01, eps, backend=backend)
        return lepton_fast.pgd_step_(out, o, g, 0.01, eps, backend=backend) * 1.0

    eps = torch.full((4,), 0.03)
    eager = lepton_fast.pgd_step(lepton_fast.pgd_step(x_adv, x_orig, grad, 0.01, eps), x_orig, grad, 0.01, eps)
    assert torch.equal(step(x_adv, x_orig, grad, eps), eager)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(step_size=-0.1), ValueError, "step_size"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps=torch.tensor([0.1, -0.1])), ValueError, "eps"),
        (dict(eps=torch.ones(3)), ValueError, "eps"),
        (dict(eps=torch.ones(2, dtype=torch.int64)), TypeError, "eps"),
        (dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
        (dict(clamp=(0.0,)), TypeError, "clamp"),
        (dict(grad=torch.zeros(2, 4)), ValueError, "grad"),
        (dict(x_orig=torch.zeros(3, 3)), ValueError, "x_orig"),
        (dict(x_adv=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x_adv"),
        (dict(x_adv=[0.0]), TypeError, "x_adv"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_arguments(kwargs, error, match):
    args = dict(x_adv=torch.rand(2, 3), x_orig=torch.rand(2, 3), grad=torch.randn(2, 3), step_size=0.1, eps=0.3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lepton_fast.pgd_step(**args)
