"""pgd_step / pgd_step_ on every kernel (CPU C++, CUDA C++, Triton).

float32 results must be bit-equal to torchattacks' eager composition ``x = x_adv + a *
g.sign(); d = (x - x_orig).clamp(-eps, eps); (x_orig + d).clamp(lo, hi)`` (float64 too;
bfloat16 / float16 are that composition in float32, rounded once), whatever form step_size,
eps and the clamp bounds take. The steps refuse, naming the fix, an x_orig farther than eps
outside the clamp box and a step that is not finite in the dtype. Cases marked `cuda` run the
CUDA C++ and the compiled Triton kernel on a GPU; without one, the Triton kernel runs in
Triton's interpreter on CPU tensors.
"""
import textwrap

import pytest
import torch

import lepton_fast
from conftest import (BROADCASTS, DEVICE_BACKENDS, C, H, N, W, as_broadcast, assert_device_assertion,
                      broadcast_operand as operand, interpreted, require,
                      run_on_each_cpu_capability)
from lepton_fast import _backend, reference
from lepton_fast.ops.adversarial import PGD_INPLACE_SPEC, PGD_SPEC

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)
CPU_DEVICES = [p for p in DEVICE_BACKENDS if p.values[0] == "cpu"]
WITH_REFERENCE = CPU_DEVICES  # the reference kernel is one of DEVICE_BACKENDS


def composition(x_adv, x_orig, grad, step, eps, clamp=(0.0, 1.0)):
    """torchattacks' PGD step, in float32 for low-precision inputs, rounded once. The sizes and
    bounds are numbers or tensors that broadcast to the inputs."""
    dt = x_adv.dtype
    a, o = (x_adv.float(), x_orig.float()) if dt in LOW else (x_adv, x_orig)

    def cast(v):
        return v.to(a.dtype) if isinstance(v, torch.Tensor) else v

    a = a + cast(step) * grad.sign().to(a.dtype)
    delta = torch.clamp(a - o, min=-cast(eps), max=cast(eps))
    out = o + delta
    if clamp is not None:
        out = torch.clamp(out, cast(clamp[0]), cast(clamp[1]))
    return out.to(dt)


def inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x_orig = torch.rand(shape, generator=g, dtype=torch.float64)
    x_adv = (x_orig + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::7] = 0.0  # sign(0) = 0
    return tuple(t.to(dtype).to(device) for t in (x_adv, x_orig, grad))


def assert_bitwise(out, expected, device, backend):
    if interpreted(device, backend) and out.dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 -> bfloat16 by truncation (a GPU rounds to
        # nearest even), so it may be one bfloat16 ulp off.
        ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp(min=1.0)
        assert ((out.float() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(out, expected), (out.double() - expected.double()).abs().max()


def assert_within(out, x_orig, eps):
    """|out - x_orig| <= eps up to the rounding of x_orig + delta: one ulp of the result."""
    eps = eps.double() if isinstance(eps, torch.Tensor) else eps
    ulp = torch.finfo(out.dtype).eps * out.double().abs().clamp(min=1.0)
    assert ((out.double() - x_orig.double()).abs() <= eps + ulp).all()


SHAPES = {
    "one-element": (1,),
    "odd-tail": (3, 5, 7),  # 105 elements: not a multiple of any vector width
    "images": (4, 3, 16, 16),
    "features": (6, 37),  # a per-sample run that is not a multiple of the vector width
}


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_composition(shape, dtype, device, backend):
    require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs(shape, dtype, device)
    for step, eps in [(0.01, 0.03), (2 / 255, 8 / 255)]:
        out = lepton_fast.pgd_step(x_adv, x_orig, grad, step, eps, backend=backend)
        assert out.dtype == dtype and out.shape == x_adv.shape
        assert_bitwise(out, composition(x_adv, x_orig, grad, step, eps), device, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_against_float64_reference(device, backend):
    require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((4, 3, 8, 8), torch.float64, device, seed=3)
    expected = reference.pgd_step(x_adv, x_orig, grad, 0.01, 0.03)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        args = (x_adv.to(dtype), x_orig.to(dtype), grad.to(dtype), 0.01, 0.03)
        out = lepton_fast.pgd_step(*args, backend=backend)
        ref_err = (reference.pgd_step(*args).double() - expected).abs().max()
        tol = 1e-6 if dtype == torch.float32 else 2 * ref_err
        assert (out.double() - expected).abs().max() <= tol


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("form", BROADCASTS.values(), ids=BROADCASTS.keys())
def test_broadcast_operands(form, dtype, device, backend):
    """step_size, eps and both clamp bounds of each form (the projection and both bounds bind
    for some elements); x_orig in [0, 1] lies within eps (>= 0.02) of the box [lo, hi]."""
    require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((N, C, H, W), dtype, device, seed=11)
    step, eps = operand(form, 0.01, 0.08, device, 12, dtype), operand(form, 0.02, 0.06, device, 13, dtype)
    lo, hi = operand(form, -0.05, 0.02, device, 14, dtype), operand(form, 0.98, 1.05, device, 15, dtype)
    out = lepton_fast.pgd_step(x_adv, x_orig, grad, step, eps, (lo, hi), backend=backend)
    b = [as_broadcast(v, x_adv) for v in (step, eps, lo, hi)]
    assert_bitwise(out, composition(x_adv, x_orig, grad, b[0], b[1], (b[2], b[3])), device, backend)
    assert_within(out, x_orig, b[1])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_attack_loop_invariants(device, backend):
    require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((8, 3, 8, 8), torch.float32, device, seed=4)
    eps = 8 / 255
    x_adv = lepton_fast.pgd_step(x_adv, x_orig, grad, 0.0, eps, backend=backend)  # project the start
    for i in range(5):
        grad = torch.randn(x_adv.shape, generator=torch.Generator().manual_seed(10 + i)).to(device)
        x_adv = lepton_fast.pgd_step(x_adv, x_orig, grad, 2.5 * eps / 4, eps, backend=backend)
        assert_within(x_adv, x_orig, eps)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    same = lepton_fast.pgd_step(x_adv, x_orig, torch.zeros_like(grad), 0.1, 1.0, backend=backend)
    assert torch.equal(same, x_adv)  # sign(0) = 0 and a projection that does not bind
    at_orig = lepton_fast.pgd_step(x_adv, x_orig, grad, 0.1, 0.0, backend=backend)
    assert torch.equal(at_orig, x_orig)  # eps = 0 gives back the clean input


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_denormal_gradients(device, backend):
    require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((2, 8), torch.float32, device, seed=5)
    grad[0, 0], grad[0, 1], grad[1, 0] = float("nan"), 1e-40, -1e-42  # NaN and two denormals
    out = lepton_fast.pgd_step(x_adv, x_orig, grad, 0.01, 0.5, clamp=None, backend=backend)
    assert torch.equal(out, composition(x_adv, x_orig, grad, 0.01, 0.5, clamp=None))
    assert out[0, 0] == x_adv[0, 0] and out[0, 1] == x_adv[0, 1] + 0.01 and out[1, 0] == x_adv[1, 0] - 0.01


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_and_mixed_grad_dtype(device, backend):
    require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((6, 10), torch.float32, device, seed=6)
    out = lepton_fast.pgd_step(x_adv.t(), x_orig.t(), grad.t(), 0.01, 0.03, backend=backend)
    assert torch.equal(out, composition(x_adv, x_orig, grad, 0.01, 0.03).t())
    # a float32 gradient too small for float16 keeps its sign
    tiny = torch.full((6, 10), 1e-9, device=device)
    out16 = lepton_fast.pgd_step(x_adv.half(), x_orig.half(), tiny, 0.01, 0.03, backend=backend)
    assert torch.equal(out16, composition(x_adv.half(), x_orig.half(), tiny, 0.01, 0.03))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_in_place(layout, device, backend):
    require(PGD_INPLACE_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((6, 10), torch.float32, device, seed=7)
    eps = torch.rand(6, device=device) * 0.05
    expected = composition(x_adv, x_orig, grad, 0.01, eps.view(6, 1))
    target = x_adv.clone() if layout == "contiguous" else x_adv.t().contiguous().t()
    ptr = target.data_ptr()
    result = lepton_fast.pgd_step_(target, x_orig, grad, 0.01, eps, backend=backend)
    assert result is target and target.data_ptr() == ptr
    assert torch.equal(target, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_normalised_images_with_their_box(device, backend):
    """Issue 15 #2: a CIFAR-normalised image lives in [-2.4, 2.8]; its per-channel box keeps
    every step within eps of x_orig, where the default [0, 1] box moved it by up to 2.4."""
    require(PGD_SPEC, device, backend)
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(3, 1, 1)
    image_adv, image, grad = inputs((4, 3, 8, 8), torch.float32, device, seed=8)
    x_orig, x_adv = (image - mean) / std, (image_adv - mean) / std
    box = ((0 - mean) / std, (1 - mean) / std)
    eps = 8 / 255 / std  # eps in pixel units, per channel in normalised units
    out = lepton_fast.pgd_step(x_adv, x_orig, grad, 2 / 255 / std, eps, box, backend=backend)
    assert torch.equal(out, composition(x_adv, x_orig, grad, 2 / 255 / std, eps, box))
    assert_within(out, x_orig, eps)
    assert (out >= box[0]).all() and (out <= box[1]).all()


@pytest.mark.parametrize("device,backend", WITH_REFERENCE)
def test_refuses_an_input_outside_the_box(device, backend):
    """Issue 15 #2: the default box on a normalised x_orig is refused with the fix, in place too."""
    if backend != "reference":
        require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((2, 3, 4, 4), torch.float32, device, seed=9)
    x_orig, x_adv = (x_orig - 0.5) / 0.25, (x_adv - 0.5) / 0.25
    with pytest.raises(ValueError, match=r"x_orig .*farther than eps.*outside the clamp box.*normalised image"):
        lepton_fast.pgd_step(x_adv, x_orig, grad, 2 / 255, 8 / 255, backend=backend)
    with pytest.raises(ValueError, match="clamp box"):
        lepton_fast.pgd_step_(x_adv.clone(), x_orig, grad, 2 / 255, 8 / 255, backend=backend)
    assert lepton_fast.pgd_step(x_adv, x_orig, grad, 2 / 255, 8 / 255, None, backend=backend).shape == x_adv.shape


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("device,backend", WITH_REFERENCE)
def test_step_beyond_the_dtype_range_is_an_error(device, backend):
    """Issue 15 #7's kind for PGD: a finite float16 input stepped to inf."""
    if backend != "reference":
        require(PGD_SPEC, device, backend)
    x_adv, x_orig, grad = inputs((3, 5), torch.float16, device, seed=10)
    big, ones = x_orig + 60000, torch.ones_like(grad)
    with pytest.raises(ValueError, match=r"not finite in float16.*step_size and eps"):
        lepton_fast.pgd_step(big, big, ones, 10000.0, 10000.0, None, backend=backend)
    # a huge step_size is harmless while eps keeps the result in range
    out = lepton_fast.pgd_step(x_adv, x_orig, grad, 1e6, 0.03, None, backend=backend)
    assert torch.equal(out, composition(x_adv, x_orig, grad, 1e6, 0.03, None))


def f64(v):
    return torch.tensor(v, dtype=torch.float64)


def _op_args(device):
    x_adv, x_orig, grad = inputs((3, 4, 5), torch.float32, device)
    per_sample = torch.rand(3, 1, 1, device=device) * 0.1
    per_row = torch.rand(4, 1, device=device)
    return [
        (x_adv, x_orig, grad, f64(0.01), f64(0.03), f64(0.0), f64(1.0)),
        (x_adv, x_orig, grad, per_sample, per_sample, None, None),
        (x_adv, x_orig, grad, f64(0.01), torch.tensor(0.05, device=device), per_row - 1, per_row + 1),
        (x_adv.double(), x_orig.double(), grad.double(), f64(0.02), f64(0.05), f64(0.0), f64(1.0)),
    ]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    """Schema, fake kernel and AOT dispatch of both ops, for each form of operand."""
    require(PGD_SPEC, device, backend)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(device, backend):  # AOT dispatch runs dozens of launches
        utils += ("test_aot_dispatch_dynamic",)
    for args in _op_args(device):
        for spec in (PGD_SPEC, PGD_INPLACE_SPEC):
            op = getattr(torch.ops.lepton_fast, spec.name).default
            call_args = (args[0].clone(),) + args[1:] if spec is PGD_INPLACE_SPEC else args
            with _backend.running(spec, backend, device):
                torch.library.opcheck(op, call_args, test_utils=utils)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph_without_recompiles(device):
    """A PGD loop under torch.compile(fullgraph=True) whose step_size and eps change every
    step (a schedule): one graph after the first specialisation, values bit-equal to eager."""
    from torch._dynamo.utils import counters

    require(PGD_SPEC, device, device)
    torch._dynamo.reset()
    counters.clear()
    x_adv, x_orig, grad = inputs((4, 3, 5), torch.float32, device)

    @torch.compile(fullgraph=True)
    def step(a, o, g, alpha, eps, per_sample):
        out = lepton_fast.pgd_step(a, o, g, alpha, eps)
        return lepton_fast.pgd_step_(out, o, g, per_sample, eps) * 1.0

    per_sample = torch.full((4,), 0.01, device=device)
    for i in range(4):
        alpha, eps = 0.005 * (i + 1), 0.02 + 0.01 * i
        first = composition(x_adv, x_orig, grad, alpha, eps)
        expected = composition(first, x_orig, grad, per_sample.view(4, 1, 1), eps)
        assert torch.equal(step(x_adv, x_orig, grad, alpha, eps, per_sample), expected)
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]


BAD_ARGUMENTS = [
    ("step_size < 0", dict(step_size=-0.1), ValueError, "step_size"),
    ("eps < 0", dict(eps=-1.0), ValueError, "eps"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps"),
    ("eps tensor < 0", dict(eps=torch.tensor([0.1, -0.1])), ValueError, "eps"),
    ("eps 1-d of another length", dict(eps=torch.ones(3)), ValueError, "eps.*per sample"),
    ("eps int tensor", dict(eps=torch.ones(2, dtype=torch.int64)), TypeError, "eps"),
    ("step_size not broadcasting", dict(step_size=torch.ones(4, 1)), ValueError, "step_size.*broadcast"),
    ("clamp min > max", dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
    ("clamp malformed", dict(clamp=(0.0,)), TypeError, "clamp"),
    ("grad shape", dict(grad=torch.zeros(2, 4)), ValueError, "grad"),
    ("x_orig shape", dict(x_orig=torch.zeros(3, 3)), ValueError, "x_orig"),
    ("x_adv int", dict(x_adv=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x_adv"),
    ("x_adv list", dict(x_adv=[0.0]), TypeError, "x_adv"),
]


@pytest.mark.parametrize("what,change,error,match", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments(what, change, error, match):
    args = dict(x_adv=torch.rand(2, 3), x_orig=torch.rand(2, 3), grad=torch.randn(2, 3), step_size=0.1, eps=0.3)
    args.update(change)
    with pytest.raises(error, match=match):
        lepton_fast.pgd_step(**args)


def test_in_place_refuses_a_tensor_autograd_tracks():
    x_adv, x_orig, grad = inputs((3, 4), torch.float32, seed=8)
    x_adv.requires_grad_()
    with pytest.raises(RuntimeError, match="x_adv requires grad"):
        lepton_fast.pgd_step_(x_adv, x_orig, grad, 0.01, 0.03)


def test_result_has_no_graph():
    x_adv, x_orig, grad = inputs((2, 3), torch.float32)
    out = lepton_fast.pgd_step(x_adv.requires_grad_(), x_orig, grad, 0.01, 0.03)
    assert not out.requires_grad


def test_other_cpu_instruction_sets():
    """The step kernel is compiled for the portable baseline, AVX2 and AVX-512 and follows
    ATen's choice; ATEN_CPU_CAPABILITY lowers it, so this machine runs the other builds too,
    bit-exact for both ops, every dtype and the constant and streamed operand paths."""
    require(PGD_SPEC, "cpu", "cpu")
    script = textwrap.dedent("""
        import torch, lepton_fast
        from lepton_fast import reference
        print(torch.backends.cpu.get_cpu_capability())
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            x, o, grad = (torch.rand(3, 2, 8, 9, generator=g).to(dtype) for _ in range(3))
            for eps in (0.05, torch.rand(3, 1, 1, 1, generator=g).to(acc) * 0.1, torch.rand(8, 9, generator=g).to(acc)):
                lo, hi = torch.full((2, 1, 1), -0.01).to(acc), 1.01
                got = lepton_fast.pgd_step(x, o, grad, 0.02, eps, (lo, hi), backend="cpu")
                assert torch.equal(got, reference.pgd_step(x, o, grad, 0.02, eps, (lo, hi))), dtype
                got = lepton_fast.fgsm_perturb(x, grad, eps, None, backend="cpu")
                assert torch.equal(got, reference.fgsm_perturb(x, grad, eps, None)), dtype
        try:
            lepton_fast.fgsm_perturb(torch.rand(70) * 3 - 1, torch.ones(70), 0.1, backend="cpu")
        except ValueError as e:
            assert "clamp box" in str(e)
        else:
            raise AssertionError("not refused")
        print("ok")
    """)
    run_on_each_cpu_capability(script)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_data_errors_are_device_assertions(backend):
    """Out-of-range inputs (a data check) end a GPU process; conftest.assert_device_assertion."""
    require(PGD_SPEC, "cuda", backend)
    assert_device_assertion("""
        x = torch.rand(4, 3, 8, 8, device="cuda")
        g = torch.randn_like(x)
        xn = (x - 0.5) / 0.25
    """, f'lepton_fast.pgd_step(x, x, g, 0.01, 0.03, backend="{backend}")',
        f'lepton_fast.pgd_step(xn, xn, g, 0.01, 0.03, backend="{backend}")')
