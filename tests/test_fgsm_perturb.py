"""fgsm_perturb / fgsm_perturb_: the FGSM step, bit-equal to the eager torch composition."""
import pytest
import torch

import lepton_fast
from lepton_fast import reference
from lepton_fast.ops import adversarial as adv_ops
from conftest import compiled_backends
from test_pgd_step import SHAPES, assert_matches

BACKENDS = ["reference"] + compiled_backends(adv_ops.FGSM_SPEC, "cpu")
LOW = (torch.bfloat16, torch.float16)


def composition(x, grad, eps, clamp=(0.0, 1.0)):
    """(x + eps * grad.sign()).clamp(lo, hi), in float32 for low-precision x, rounded once."""
    a = x.float() if x.dtype in LOW else x
    eps = eps.to(a.dtype).reshape((-1,) + (1,) * (a.dim() - 1)) if isinstance(eps, torch.Tensor) else eps
    out = a + eps * grad.sign().to(a.dtype)
    return (out if clamp is None else torch.clamp(out, *clamp)).to(x.dtype)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::5] = 0.0  # sign(0) = 0
    return x.to(dtype), grad.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_composition(backend, dtype, shape):
    x, grad = inputs(shape, dtype)
    for eps in (8 / 255, 0.3):
        out = lepton_fast.fgsm_perturb(x, grad, eps, backend=backend)
        assert out.dtype == dtype and out.shape == x.shape
        assert_matches(out, composition(x, grad, eps), backend)
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_float64_reference(backend):
    x, grad = inputs((4, 3, 8, 8), torch.float64, seed=3)
    expected = reference.fgsm_perturb(x, grad, 0.03)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = lepton_fast.fgsm_perturb(x.to(dtype), grad.to(dtype), 0.03, backend=backend)
        ref_err = (reference.fgsm_perturb(x.to(dtype), grad.to(dtype), 0.03).double() - expected).abs().max()
        tol = 1e-6 if dtype == torch.float32 else 2 * ref_err
        assert (out.double() - expected).abs().max() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_sample_eps_and_no_clamp(backend, dtype):
    x, grad = inputs((5, 2, 9), dtype, seed=1)
    x = x * 6 - 3  # features, not in [0, 1]
    eps = torch.rand(5, generator=torch.Generator().manual_seed(2))
    for clamp in (None, (-1.0, 2.5)):
        out = lepton_fast.fgsm_perturb(x, grad, eps, clamp, backend=backend)
        assert_matches(out, composition(x, grad, eps, clamp), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_sign_zero_nan_and_denormal(backend):
    x, grad = inputs((3, 11), torch.float32, seed=4)
    assert torch.equal(lepton_fast.fgsm_perturb(x, grad, 0.0, backend=backend), x)
    assert torch.equal(lepton_fast.fgsm_perturb(x, torch.zeros_like(grad), 0.5, backend=backend), x)
    grad[0, 0], grad[0, 1], grad[0, 2] = float("nan"), 1e-40, -1e-44
    out = lepton_fast.fgsm_perturb(x, grad, 0.01, None, backend=backend)
    assert out[0, 0] == x[0, 0] and out[0, 1] == x[0, 1] + 0.01 and out[0, 2] == x[0, 2] - 0.01
    assert torch.equal(out, composition(x, grad, 0.01, None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_in_place(backend, layout):
    x, grad = inputs((6, 10), torch.float32, seed=5)
    expected = composition(x, grad, 0.03)
    target = x.clone() if layout == "contiguous" else x.t().contiguous().t()
    ptr = target.data_ptr()
    assert lepton_fast.fgsm_perturb_(target, grad, 0.03, backend=backend) is target
    assert target.data_ptr() == ptr and torch.equal(target, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x, grad = inputs((4, 6, 5), torch.float32, seed=6)
    out = lepton_fast.fgsm_perturb(x.transpose(0, 2), grad.transpose(0, 2), 0.03, backend=backend)
    assert torch.equal(out, composition(x, grad, 0.03).transpose(0, 2))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_opcheck(backend):
    x, grad = inputs((3, 4, 5), torch.float32)
    eps = torch.rand(3) * 0.1
    for args in [(x, grad, 0.03, None, 0.0, 1.0, backend), (x, grad, 0.0, eps, None, None, backend)]:
        torch.library.opcheck(torch.ops.lepton_fast.fgsm_perturb.default, args)
        torch.library.opcheck(torch.ops.lepton_fast.fgsm_perturb_.default, (args[0].clone(),) + args[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, grad = inputs((4, 3, 5), torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attack(x, g):
        out = lepton_fast.fgsm_perturb(x, g, 0.03, backend=backend)
        return lepton_fast.fgsm_perturb_(out, g, 0.01, backend=backend) + 0.0

    expected = composition(composition(x, grad, 0.03), grad, 0.01)
    assert torch.equal(attack(x, grad), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(eps="0.1"), TypeError, "eps"),
        (dict(eps=torch.tensor([0.1, -0.1])), ValueError, "eps"),
        (dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
        (dict(clamp=(0.0, float("nan"))), ValueError, "clamp"),
        (dict(grad=torch.zeros(3, 2)), ValueError, "grad"),
        (dict(grad=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "grad"),
        (dict(x=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_arguments(kwargs, error, match):
    args = dict(x=torch.rand(2, 3), grad=torch.randn(2, 3), eps=0.3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lepton_fast.fgsm_perturb(**args)


def test_in_place_refuses_a_tensor_autograd_tracks():
    """As torch's own in-place ops on a leaf that requires grad; fine under no_grad."""
    x, grad = inputs((3, 4), torch.float32, seed=8)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="x requires grad"):
        lepton_fast.fgsm_perturb_(x, grad, 0.03)
    with pytest.raises(RuntimeError, match="x_adv requires grad"):
        lepton_fast.pgd_step_(x, x.detach(), grad, 0.01, 0.03)
    with torch.no_grad():
        expected = composition(x.detach(), grad, 0.03)
        assert torch.equal(lepton_fast.fgsm_perturb_(x, grad, 0.03), expected)
