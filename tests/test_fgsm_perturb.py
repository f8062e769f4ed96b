"""fgsm_perturb / fgsm_perturb_ on every kernel (CPU C++, CUDA C++, Triton).

float32 results must be bit-equal to the eager torch composition ``(x + eps * grad.sign()).clamp(lo,
hi)`` (float64 too; bfloat16 / float16 are computed in float32 and rounded once, as that
composition in float32 then rounded), whatever form eps and the clamp bounds take. The steps
refuse, naming the fix, an x farther than eps outside the clamp box (a normalised image clamped
to [0, 1]) and a step that is not finite in x's dtype. Cases marked `cuda` run the CUDA C++ and
the compiled Triton kernel on a GPU; without one, the Triton kernel runs in Triton's
interpreter on CPU tensors.
"""

import pytest
import torch

import lepton_fast
from conftest import (BROADCASTS, DEVICE_BACKENDS, C, H, N, W, as_broadcast, assert_device_assertion,
                      broadcast_operand as operand, interpreted, require)
from lepton_fast import _backend, reference
from lepton_fast.ops.adversarial import FGSM_INPLACE_SPEC, FGSM_SPEC

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)
CPU_DEVICES = [p for p in DEVICE_BACKENDS if p.values[0] == "cpu"]
WITH_REFERENCE = CPU_DEVICES  # the reference kernel is one of DEVICE_BACKENDS


def composition(x, grad, eps, clamp=(0.0, 1.0)):
    """The eager torch composition, in float32 for low-precision x, rounded once. eps and the
    bounds are numbers or tensors that broadcast to x."""
    a = x.float() if x.dtype in LOW else x

    def cast(v):
        return v.to(a.dtype) if isinstance(v, torch.Tensor) else v

    out = a + cast(eps) * grad.sign().to(a.dtype)
    return (out if clamp is None else torch.clamp(out, cast(clamp[0]), cast(clamp[1]))).to(x.dtype)


def inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::5] = 0.0  # sign(0) = 0
    return x.to(dtype).to(device), grad.to(dtype).to(device)


def assert_bitwise(out, expected, device, backend):
    if interpreted(device, backend) and out.dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 -> bfloat16 by truncation (a GPU rounds to
        # nearest even), so it may be one bfloat16 ulp off.
        ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp(min=1.0)
        assert ((out.float() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(out, expected), (out.double() - expected.double()).abs().max()


def assert_within(out, x, eps):
    """|out - x| <= eps up to the rounding of x + eps: one ulp of the result."""
    eps = eps.double() if isinstance(eps, torch.Tensor) else eps
    ulp = torch.finfo(out.dtype).eps * out.double().abs().clamp(min=1.0)
    assert ((out.double() - x.double()).abs() <= eps + ulp).all()


SHAPES = {
    "one-element": (1,),
    "odd-tail": (3, 5, 7),  # 105 elements: not a multiple of any vector width
    "images": (4, 3, 16, 16),
    "features": (6, 37),
}


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_composition(shape, dtype, device, backend):
    require(FGSM_SPEC, device, backend)
    x, grad = inputs(shape, dtype, device)
    for eps in (8 / 255, 0.3):
        out = lepton_fast.fgsm_perturb(x, grad, eps, backend=backend)
        assert out.dtype == dtype and out.shape == x.shape
        assert_bitwise(out, composition(x, grad, eps), device, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_against_float64_reference(device, backend):
    require(FGSM_SPEC, device, backend)
    x, grad = inputs((4, 3, 8, 8), torch.float64, device, seed=3)
    expected = reference.fgsm_perturb(x, grad, 0.03)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = lepton_fast.fgsm_perturb(x.to(dtype), grad.to(dtype), 0.03, backend=backend)
        ref_err = (reference.fgsm_perturb(x.to(dtype), grad.to(dtype), 0.03).double() - expected).abs().max()
        tol = 1e-6 if dtype == torch.float32 else 2 * ref_err
        assert (out.double() - expected).abs().max() <= tol


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("form", BROADCASTS.values(), ids=BROADCASTS.keys())
def test_broadcast_operands(form, dtype, device, backend):
    """eps and both clamp bounds of each form. x in [0, 1] lies within eps (>= 0.1) of the box
    [lo, hi] (lo <= 0.05, hi >= 0.95), and both bounds bind for some elements."""
    require(FGSM_SPEC, device, backend)
    x, grad = inputs((N, C, H, W), dtype, device, seed=11)
    eps = operand(form, 0.1, 0.3, device, 12, dtype)
    lo, hi = operand(form, -0.1, 0.05, device, 13, dtype), operand(form, 0.95, 1.1, device, 14, dtype)
    out = lepton_fast.fgsm_perturb(x, grad, eps, (lo, hi), backend=backend)
    expected = composition(x, grad, as_broadcast(eps, x), (as_broadcast(lo, x), as_broadcast(hi, x)))
    assert_bitwise(out, expected, device, backend)
    assert_within(out, x, as_broadcast(eps, x))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_normalised_images_with_their_box(device, backend):
    """Issue 15 #2: a CIFAR-normalised image lives in [-2.4, 2.8]; its per-channel box keeps the
    step within eps, where the default [0, 1] box would have moved it by up to 2.4."""
    require(FGSM_SPEC, device, backend)
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(3, 1, 1)
    image, grad = inputs((4, 3, 8, 8), torch.float32, device, seed=15)
    x = (image - mean) / std
    box = ((0 - mean) / std, (1 - mean) / std)
    out = lepton_fast.fgsm_perturb(x, grad, 8 / 255, box, backend=backend)
    assert torch.equal(out, composition(x, grad, 8 / 255, box))
    assert_within(out, x, 8 / 255)
    assert (out >= box[0]).all() and (out <= box[1]).all()


@pytest.mark.parametrize("device,backend", WITH_REFERENCE)
def test_refuses_an_input_outside_the_box(device, backend):
    """Issue 15 #2: the default box on a normalised image is refused with the fix, in place too."""
    if backend != "reference":
        require(FGSM_SPEC, device, backend)
    image, grad = inputs((2, 3, 4, 4), torch.float32, device, seed=16)
    x = (image - 0.5) / 0.25
    with pytest.raises(ValueError, match=r"farther than eps.*outside the clamp box.*normalised image.*\[C, 1, 1\]"):
        lepton_fast.fgsm_perturb(x, grad, 8 / 255, backend=backend)
    with pytest.raises(ValueError, match="clamp box"):
        lepton_fast.fgsm_perturb_(x.clone(), grad, 8 / 255, backend=backend)
    # within eps of the box is fine: the clamp then moves no element by more than eps
    near = torch.full((2, 3), -0.01, device=device)
    out = lepton_fast.fgsm_perturb(near, torch.ones_like(near), 0.02, backend=backend)
    assert torch.equal(out, torch.full_like(near, 0.01))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("device,backend", WITH_REFERENCE)
def test_eps_beyond_the_dtype_range_is_an_error(device, backend):
    """Issue 15 #7: float16 with eps = 1e6 and no clamp stepped to inf silently."""
    if backend != "reference":
        require(FGSM_SPEC, device, backend)
    x, grad = inputs((3, 5), torch.float16, device, seed=17)
    with pytest.raises(ValueError, match=r"not finite in float16.*eps"):
        lepton_fast.fgsm_perturb(x, grad, 1e6, None, backend=backend)
    with pytest.raises(ValueError, match=r"not finite in float16.*eps"):  # x near the top of the range
        lepton_fast.fgsm_perturb(x + 60000, torch.ones_like(grad), 10000.0, None, backend=backend)
    with pytest.raises(ValueError, match=r"not finite in bfloat16.*eps"):
        lepton_fast.fgsm_perturb(x.bfloat16(), grad.bfloat16(), 3.4e38, None, backend=backend)
    # the same eps with a clamp, or where every sign is 0, gives finite values: no error
    clamped = lepton_fast.fgsm_perturb(x, grad, 1e6, (0.0, 1.0), backend=backend)
    assert torch.equal(clamped, composition(x, grad, 1e6, (0.0, 1.0)))
    assert torch.equal(lepton_fast.fgsm_perturb(x, torch.zeros_like(grad), 1e6, None, backend=backend), x)
    # an input that is already inf is the user's value, passed through as torch does
    x[0, 0] = float("inf")
    assert lepton_fast.fgsm_perturb(x, grad, 1.0, None, backend=backend)[0, 0] == float("inf")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eps_zero_sign_zero_nan_and_denormal(device, backend):
    require(FGSM_SPEC, device, backend)
    x, grad = inputs((3, 11), torch.float32, device, seed=4)
    assert torch.equal(lepton_fast.fgsm_perturb(x, grad, 0.0, backend=backend), x)
    assert torch.equal(lepton_fast.fgsm_perturb(x, torch.zeros_like(grad), 0.5, backend=backend), x)
    grad[0, 0], grad[0, 1], grad[0, 2] = float("nan"), 1e-40, -1e-44
    out = lepton_fast.fgsm_perturb(x, grad, 0.01, None, backend=backend)
    assert out[0, 0] == x[0, 0] and out[0, 1] == x[0, 1] + 0.01 and out[0, 2] == x[0, 2] - 0.01
    assert torch.equal(out, composition(x, grad, 0.01, None))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_in_place(layout, device, backend):
    require(FGSM_INPLACE_SPEC, device, backend)
    x, grad = inputs((6, 10), torch.float32, device, seed=5)
    eps = torch.rand(6, 1, device=device) * 0.1
    expected = composition(x, grad, eps)
    target = x.clone() if layout == "contiguous" else x.t().contiguous().t()
    ptr = target.data_ptr()
    assert lepton_fast.fgsm_perturb_(target, grad, eps, backend=backend) is target
    assert target.data_ptr() == ptr and torch.equal(target, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs_and_grad_of_another_dtype(device, backend):
    require(FGSM_SPEC, device, backend)
    x, grad = inputs((4, 6, 5), torch.float32, device, seed=6)
    out = lepton_fast.fgsm_perturb(x.transpose(0, 2), grad.transpose(0, 2), 0.03, backend=backend)
    assert torch.equal(out, composition(x, grad, 0.03).transpose(0, 2))
    # a float32 gradient too small for float16 keeps its sign
    tiny = torch.full((4, 6, 5), 1e-9, device=device)
    out16 = lepton_fast.fgsm_perturb(x.half(), tiny, 0.03, backend=backend)
    assert torch.equal(out16, composition(x.half(), tiny, 0.03))


def f64(v):
    return torch.tensor(v, dtype=torch.float64)


def _op_args(device):
    x, grad = inputs((3, 4, 5), torch.float32, device, seed=7)
    per_sample = torch.rand(3, 1, 1, device=device) * 0.1
    per_row = torch.rand(4, 1, device=device)
    return [
        (x, grad, f64(0.03), f64(0.0), f64(1.0)),
        (x, grad, per_sample, None, None),
        (x, grad, torch.tensor(0.05, device=device), per_row - 1, per_row + 1),
        (x.double(), grad.double(), f64(0.2), f64(0.1), f64(0.9)),
    ]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    """Schema, fake kernel and AOT dispatch of both ops, for each form of operand."""
    require(FGSM_SPEC, device, backend)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(device, backend):  # AOT dispatch runs dozens of launches
        utils += ("test_aot_dispatch_dynamic",)
    for args in _op_args(device):
        for spec in (FGSM_SPEC, FGSM_INPLACE_SPEC):
            op = getattr(torch.ops.lepton_fast, spec.name).default
            call_args = (args[0].clone(),) + args[1:] if spec is FGSM_INPLACE_SPEC else args
            with _backend.running(spec, backend, device):
                torch.library.opcheck(op, call_args, test_utils=utils)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph_without_recompiles(device):
    """An attack loop under torch.compile(fullgraph=True): eps and the clamp bounds change every
    step (a schedule) and compile once after the first specialisation; tensors of every form."""
    from torch._dynamo.utils import counters

    require(FGSM_SPEC, device, device)
    torch._dynamo.reset()
    counters.clear()
    x, grad = inputs((4, 3, 5), torch.float32, device, seed=8)

    @torch.compile(fullgraph=True)
    def attack(x, g, eps, hi, per_sample):
        out = lepton_fast.fgsm_perturb(x, g, eps, (0.0, hi))
        return lepton_fast.fgsm_perturb_(out, g, per_sample, None) * 1.0

    per_sample = torch.rand(4, device=device) * 0.1
    for step in range(4):
        eps, hi = 0.01 * (step + 1), 1.0 - 0.002 * step
        expected = composition(composition(x, grad, eps, (0.0, hi)), grad, per_sample.view(4, 1, 1), None)
        assert torch.equal(attack(x, grad, eps, hi, per_sample), expected)
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]


BAD_ARGUMENTS = [
    ("eps < 0", dict(eps=-0.1), ValueError, "eps"),
    ("eps inf", dict(eps=float("inf")), ValueError, "eps"),
    ("eps str", dict(eps="0.1"), TypeError, "eps"),
    ("eps tensor < 0", dict(eps=torch.tensor([0.1, -0.1])), ValueError, "eps"),
    ("eps nan tensor", dict(eps=torch.tensor([[0.1], [float("nan")]])), ValueError, "eps"),
    ("eps int tensor", dict(eps=torch.ones(2, dtype=torch.int64)), TypeError, "eps"),
    ("eps 1-d of another length", dict(eps=torch.ones(3)), ValueError, "eps.*per sample"),
    ("eps not broadcasting", dict(eps=torch.ones(2, 4)), ValueError, "eps.*broadcast"),
    ("clamp min > max", dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
    ("clamp min > max tensors", dict(clamp=(torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]))), ValueError,
     "clamp"),
    ("clamp nan", dict(clamp=(0.0, float("nan"))), ValueError, "clamp"),
    ("clamp malformed", dict(clamp=(0.0,)), TypeError, "clamp"),
    ("grad shape", dict(grad=torch.zeros(3, 2)), ValueError, "grad"),
    ("grad int", dict(grad=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "grad"),
    ("x int", dict(x=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x"),
]


@pytest.mark.parametrize("what,change,error,match", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments(what, change, error, match):
    args = dict(x=torch.rand(2, 3), grad=torch.randn(2, 3), eps=0.3)
    args.update(change)
    with pytest.raises(error, match=match):
        lepton_fast.fgsm_perturb(**args)


def test_in_place_refuses_a_tensor_autograd_tracks():
    """As torch's own in-place ops on a leaf that requires grad; fine under no_grad."""
    x, grad = inputs((3, 4), torch.float32, seed=9)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="x requires grad"):
        lepton_fast.fgsm_perturb_(x, grad, 0.03)
    with torch.no_grad():
        expected = composition(x.detach(), grad, 0.03)
        assert torch.equal(lepton_fast.fgsm_perturb_(x, grad, 0.03), expected)


def test_result_has_no_graph():
    x, grad = inputs((2, 3), torch.float32)
    assert not lepton_fast.fgsm_perturb(x.requires_grad_(), grad, 0.03).requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_data_errors_are_device_assertions(backend):
    """Out-of-range inputs (a data check) end a GPU process; conftest.assert_device_assertion."""
    require(FGSM_SPEC, "cuda", backend)
    assert_device_assertion("""
        x = torch.rand(4, 3, 8, 8, device="cuda")
        g = torch.randn_like(x)
    """, f'lepton_fast.fgsm_perturb(x, g, 0.03, backend="{backend}")',
        f'lepton_fast.fgsm_perturb((x - 0.5) / 0.25, g, 0.03, backend="{backend}")')
