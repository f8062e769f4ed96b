"""fused_kd_loss's GPU kernels against reference.py run in float64.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), on small shapes with a small column block so that every block-boundary
case shows: C smaller than one block, C a multiple of it, C spanning several blocks with a
ragged tail. Each interpreted launch costs about half a second, so the cases are few and
chosen. Tests marked `cuda` run the Triton and the CUDA C++ kernel on CUDA tensors.
"""
from __future__ import annotations

import os

import pytest
import torch

from lepton_fast import _backend, fused_kd_loss, reference
from lepton_fast.ops import kd_loss as kd_ops

# The interpreter evaluates both sides of tl.where with numpy, which warns about the
# -inf - -inf of masked lanes on the side that is thrown away.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton interpreter tests run where there is no GPU")
LOW_PRECISION = (torch.bfloat16, torch.float16)
NEG_INF = float("-inf")

# (temperature, divergence, beta, alpha, label_smoothing, scale_by_t2)
MODES = {
    "fwd_kl_T2": (2.0, "forward_kl", 0.5, 0.0, 0.0, True),
    "rev_kl_T0.5_unscaled": (0.5, "reverse_kl", 0.5, 0.0, 0.0, False),
    "jsd_beta0.3": (1.5, "jsd", 0.3, 0.0, 0.0, True),
    "jsd_beta0_is_fwd": (1.0, "jsd", 0.0, 0.0, 0.0, True),
    "jsd_beta1_is_rev": (2.0, "jsd", 1.0, 0.0, 0.0, True),
    "alpha0.4_smooth0.1_fwd": (2.0, "forward_kl", 0.5, 0.4, 0.1, True),
    "alpha0.5_jsd": (3.0, "jsd", 0.7, 0.5, 0.0, True),
    "alpha1_ce_only_smooth": (1.0, "forward_kl", 0.5, 1.0, 0.2, True),
}


def triton_kernel(*args, block=None):
    from lepton_fast.kernels import kd_loss

    return kd_loss.kd_loss_forward(*args, block=block)


def run_kernel(backend, student, teacher, labels, grad_scale, mode, block=None):
    temperature, divergence, beta, alpha, eps, t2 = mode
    args = (student, teacher, labels, torch.tensor(grad_scale, device=student.device), temperature,
            divergence, beta, alpha, eps, -100, t2, True)
    if backend == "triton":
        return triton_kernel(*args, block=block)
    return torch.ops.lepton_fast.kd_loss_forward(*args)


def reference_rows_grad(student, teacher, labels, grad_scale, mode):
    """Per-row losses and grad_scale * d(sum of rows)/d(student), by autograd on reference.py
    at the dtype of the inputs (float64 for the oracle)."""
    temperature, divergence, beta, alpha, eps, t2 = mode
    student = student.detach().clone().requires_grad_(True)
    rows = reference.kd_loss_rows(
        student, teacher, labels, temperature=temperature, divergence=divergence, beta=beta,
        alpha=alpha, label_smoothing=eps, scale_by_t2=t2,
    )
    (grad,) = torch.autograd.grad(rows.sum() * grad_scale, student)
    return rows.detach(), grad


def assert_matches_reference(rows, grad, student, teacher, labels, grad_scale, mode):
    exp_rows, exp_grad = reference_rows_grad(student.double(), teacher.double(), labels, grad_scale, mode)
    assert rows.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    if student.dtype in LOW_PRECISION:
        # DESIGN.md: at most twice the error of reference.py run in the same precision
        # (plus float32's 1e-5 floor: the reference's low-precision rows are float32 too).
        ref_rows, ref_grad = reference_rows_grad(student, teacher, labels, grad_scale, mode)
        for got, ref, exp in ((rows, ref_rows, exp_rows), (grad, ref_grad, exp_grad)):
            ref_err = (ref.double() - exp).abs().max().item()
            err = (got.double() - exp).abs().max().item()
            assert err <= 2 * ref_err + 1e-5, (err, ref_err)
    else:
        torch.testing.assert_close(rows.double(), exp_rows, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.double(), exp_grad, atol=1e-5, rtol=1e-5)


def make_inputs(n, c, dtype, device="cpu", *, ignored=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, c, generator=g) * 2).to(dtype).to(device)
    teacher = (torch.randn(n, c, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, c, (n,), generator=g)
    for row in ignored:
        if row < n:
            labels[row] = -100
    return student, teacher, labels.to(device)


# ---------------------------------------------------------------------------------------
# Triton under the interpreter, CPU tensors
# ---------------------------------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("mode", list(MODES.values()), ids=list(MODES))
def test_triton_modes(mode):
    # C=50 with a block of 16: three full blocks and a ragged tail of 2 columns.
    student, teacher, labels = make_inputs(3, 50, torch.float32)
    rows, grad = run_kernel("triton", student, teacher, labels, 0.37, mode, block=16)
    assert_matches_reference(rows, grad, student, teacher, labels, 0.37, mode)
    assert rows[1] == 0 and (grad[1] == 0).all()  # the ignored row


@interpreter
@pytest.mark.parametrize(
    "n,c,block",
    [
        (3, 10, 16),  # C smaller than one block
        (2, 32, 16),  # C exactly two blocks
        (1, 1, 16),  # a single class: every divergence is 0
        (2, 300, None),  # the launcher's own block choice (one block of 512)
    ],
    ids=["C<block", "C=2blocks", "C=1", "default_block"],
)
def test_triton_shapes(n, c, block):
    mode = MODES["alpha0.4_smooth0.1_fwd"]
    student, teacher, labels = make_inputs(n, c, torch.float32, ignored=())
    rows, grad = run_kernel("triton", student, teacher, labels, 1.0, mode, block=block)
    assert_matches_reference(rows, grad, student, teacher, labels, 1.0, mode)


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode_name", ["fwd_kl_T2", "jsd_beta0.3", "alpha0.4_smooth0.1_fwd"])
def test_triton_dtypes(dtype, mode_name):
    mode = MODES[mode_name]
    student, teacher, labels = make_inputs(3, 40, dtype)
    rows, grad = run_kernel("triton", student, teacher, labels, 0.5, mode, block=16)
    assert_matches_reference(rows, grad, student, teacher, labels, 0.5, mode)


def masked_inputs(divergence, device="cpu"):
    """-inf masks that keep every row's loss finite for ``divergence``: shared masks (the
    first column, so the running max starts at -inf, and one whole block of 16), plus
    teacher-only masks where the divergence weights by p_t (forward KL, JSD) and
    student-only ones where it weights by p_s (reverse KL, JSD)."""
    student, teacher, labels = make_inputs(3, 50, torch.float32, device)
    for x in (student, teacher):
        x[:, 0] = NEG_INF
        x[0, 16:32] = NEG_INF
    if divergence in ("forward_kl", "jsd"):
        teacher[:, 40] = NEG_INF
    if divergence in ("reverse_kl", "jsd"):
        student[:, 45] = NEG_INF
    labels[0] = 3
    # An ignored row may hold anything, even no finite logit at all.
    student[1] = NEG_INF
    teacher[1] = NEG_INF
    return student, teacher, labels


@interpreter
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_triton_masked_logits(divergence):
    mode = (2.0, divergence, 0.4, 0.3, 0.0, True)  # CE too: its -inf logits must not give NaN
    student, teacher, labels = masked_inputs(divergence)
    rows, grad = run_kernel("triton", student, teacher, labels, 0.37, mode, block=16)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert_matches_reference(rows, grad, student, teacher, labels, 0.37, mode)


@interpreter
def test_triton_infinite_and_undefined_rows():
    student, teacher, _ = make_inputs(3, 20, torch.float32, ignored=())
    student[0, 5] = NEG_INF  # the student rules out a class the teacher allows: KL = +inf
    student[2] = NEG_INF  # no finite logit: softmax undefined, NaN for the Python layer
    rows, _ = run_kernel("triton", student, teacher, None, 1.0, MODES["fwd_kl_T2"], block=16)
    assert rows[0] == float("inf")
    assert torch.isfinite(rows[1])
    assert torch.isnan(rows[2])
    with pytest.raises(ValueError, match="entirely -inf"):
        fused_kd_loss(student, teacher, backend="triton")


@interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_public_op_backward(reduction):
    # End to end through the custom op: grad_scale 1/N from "mean", grad_output != 1.
    student, teacher, labels = make_inputs(4, 24, torch.float32)
    kwargs = dict(temperature=2.0, labels=labels, alpha=0.3, reduction=reduction)
    x = student.clone().requires_grad_(True)
    loss = fused_kd_loss(x, teacher, backend="triton", **kwargs)
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    (loss * weight).sum().backward()
    x64 = student.double().requires_grad_(True)
    expected = reference.fused_kd_loss(x64, teacher.double(), **kwargs)
    (expected * weight.double()).sum().backward()
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


@interpreter
def test_triton_without_grad():
    # compute_grad=False (no_grad, or a student that needs no gradient): losses only.
    student, teacher, labels = make_inputs(3, 20, torch.float32)
    mode = MODES["jsd_beta0.3"]
    temperature, divergence, beta, alpha, eps, t2 = mode
    rows, grad = triton_kernel(student, teacher, labels, torch.tensor(1.0), temperature, divergence, beta, alpha,
                               eps, -100, t2, False, block=16)
    assert grad.numel() == 0
    exp_rows, _ = reference_rows_grad(student.double(), teacher.double(), labels, 1.0, mode)
    torch.testing.assert_close(rows.double(), exp_rows, atol=1e-5, rtol=1e-5)


@interpreter
def test_triton_opcheck():
    student, teacher, labels = make_inputs(3, 10, torch.float32)
    student.requires_grad_(True)
    args = (student, teacher, labels, 2.0, "forward_kl", 0.5, 0.3, 0.1, -100, True, "mean", True, "triton")
    # The registration is shared by every backend; what is Triton's own is that its outputs
    # match the fake impl. AOT dispatch (dozens of interpreted launches) runs on CUDA below.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lepton_fast.kd_loss, args, test_utils=utils)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", ["one", "0-d", "per_row"])
def test_triton_scale_grad(dtype, scale):
    from lepton_fast.kernels import scale_grad

    grad = torch.randn(5, 37, dtype=dtype)
    factor = {
        "one": torch.tensor(1.0),
        "0-d": torch.tensor(-2.5),
        "per_row": torch.rand(5) + 0.5,
    }[scale]
    expected = (grad.float() * (factor if factor.dim() == 0 else factor[:, None])).to(dtype)
    before = grad.clone()
    scale_grad.scale_grad_(grad, factor)
    # The interpreter rounds float32 -> bfloat16 toward zero (GPUs round to nearest even),
    # so allow one bfloat16 ulp there; float32 is exact.
    rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(grad, expected, atol=0, rtol=rtol)
    if scale == "one":
        assert torch.equal(grad, before)


# ---------------------------------------------------------------------------------------
# CUDA tensors: the CUDA C++ kernel and the compiled Triton kernel
# ---------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


def require(backend):
    why = _backend.unavailable(kd_ops.SPEC, backend, "cuda")
    if why is not None:
        pytest.fail(f"{backend} backend unavailable on a CUDA machine: {why}")


# Every mode in float32 and bfloat16; float16 shares bfloat16's code paths, so one mode.
CUDA_DTYPE_MODES = [
    (dtype, mode)
    for dtype in (torch.float32, torch.bfloat16)
    for mode in ("fwd_kl_T2", "rev_kl_T0.5_unscaled", "jsd_beta0.3", "alpha0.4_smooth0.1_fwd")
] + [(torch.float16, "alpha0.4_smooth0.1_fwd")]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "n,c",
    [(37, 1000), (5, 50257), (3, 7), (4, 131072)],
    ids=["C=1000", "C=50257_odd_unvectorised", "C=7_tiny", "C=131072_wide"],
)
@pytest.mark.parametrize("dtype,mode_name", CUDA_DTYPE_MODES, ids=[f"{d}-{m}" for d, m in CUDA_DTYPE_MODES])
def test_cuda_matches_reference(backend, dtype, n, c, mode_name):
    require(backend)
    mode = MODES[mode_name]
    student, teacher, labels = make_inputs(n, c, dtype, "cuda")
    rows, grad = run_kernel(backend, student, teacher, labels, 0.37, mode)
    assert_matches_reference(rows, grad, student, teacher, labels, 0.37, mode)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_cuda_masked_logits(backend, divergence):
    require(backend)
    mode = (2.0, divergence, 0.4, 0.3, 0.0, True)
    student, teacher, labels = masked_inputs(divergence, "cuda")
    rows, grad = run_kernel(backend, student, teacher, labels, 0.37, mode)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert_matches_reference(rows, grad, student, teacher, labels, 0.37, mode)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_unaligned_rows(backend):
    # A view that starts one element in: rows are not 16-byte aligned, the scalar path runs.
    require(backend)
    mode = MODES["jsd_beta0.3"]
    student, teacher, labels = make_inputs(6, 1025, torch.bfloat16, "cuda")
    student, teacher = student[:, 1:], teacher[:, 1:]
    labels = labels.clamp(max=1023)
    rows, grad = run_kernel(backend, student, teacher, labels, 0.37, mode)
    assert_matches_reference(rows, grad, student, teacher, labels, 0.37, mode)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_public_op_backward(backend, reduction):
    # Exercises scale_grad_: grad_output 1 (skipped on the device), a scalar != 1, and [N].
    require(backend)
    student, teacher, labels = make_inputs(64, 5000, torch.bfloat16, "cuda")
    kwargs = dict(temperature=2.0, labels=labels, alpha=0.3, reduction=reduction)
    for weight in (None, 1.7):
        x = student.clone().requires_grad_(True)
        loss = fused_kd_loss(x, teacher, backend=backend, **kwargs)
        out = loss.sum() if weight is None else (loss * weight).sum()
        out.backward()
        x64 = student.double().requires_grad_(True)
        expected = reference.fused_kd_loss(x64, teacher.double(), **kwargs)
        (expected.sum() if weight is None else (expected * weight).sum()).backward()
        torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-4)
        ref_x = student.clone().requires_grad_(True)
        ref_loss = reference.fused_kd_loss(ref_x, teacher, **kwargs)
        (ref_loss.sum() if weight is None else (ref_loss * weight).sum()).backward()
        ref_err = (ref_x.grad.double() - x64.grad).abs().max().item()
        assert (x.grad.double() - x64.grad).abs().max().item() <= 2 * ref_err + 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", ["one", "0-d", "per_row"])
def test_cuda_scale_grad(backend, dtype, scale):
    require(backend)
    grad = torch.randn(33, 1000, dtype=dtype, device="cuda")
    factor = {
        "one": torch.tensor(1.0, device="cuda"),
        "0-d": torch.tensor(-2.5, device="cuda"),
        "per_row": torch.rand(33, device="cuda") + 0.5,
    }[scale]
    expected = (grad.float() * (factor if factor.dim() == 0 else factor[:, None])).to(dtype)
    kernel = torch.ops.lepton_fast.scale_grad_
    if backend == "triton":
        from lepton_fast.kernels.scale_grad import scale_grad_ as kernel
    kernel(grad, factor)
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_opcheck(backend):
    require(backend)
    student, teacher, labels = make_inputs(8, 300, torch.float32, "cuda")
    if backend == "cuda":
        # The C++ kernels have no fake impls of their own (the public custom ops carry them):
        # check that they honour their schemas (what they mutate, what they alias).
        grad_scale = torch.tensor(0.5, device="cuda")
        schema_only = ("test_schema",)
        torch.library.opcheck(
            torch.ops.lepton_fast.kd_loss_forward,
            (student, teacher, labels, grad_scale, 2.0, "jsd", 0.3, 0.2, 0.1, -100, True, True),
            test_utils=schema_only,
        )
        torch.library.opcheck(
            torch.ops.lepton_fast.scale_grad_, (torch.randn(8, 300, device="cuda"), grad_scale), test_utils=schema_only
        )
    student.requires_grad_(True)
    args = (student, teacher, labels, 2.0, "forward_kl", 0.5, 0.3, 0.1, -100, True, "mean", True, backend)
    torch.library.opcheck(torch.ops.lepton_fast.kd_loss, args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_compile_fullgraph(backend):
    require(backend)
    student, teacher, labels = make_inputs(16, 3000, torch.bfloat16, "cuda")

    def step(x, t, y):
        return fused_kd_loss(x, t, 2.0, labels=y, alpha=0.2, divergence="jsd", backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    x = student.clone().requires_grad_(True)
    loss = compiled(x, teacher, labels)
    (loss * 3.0).backward()
    ref_x = student.clone().requires_grad_(True)
    ref = step(ref_x, teacher, labels)
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # Traced, the backward multiplies out of place (lepton_fast/ops/_grad.py): one bf16 rounding.
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_llama3_vocab(backend):
    # Llama-3's vocabulary in bfloat16: the wide-row path over many column blocks.
    require(backend)
    mode = MODES["alpha0.4_smooth0.1_fwd"]
    student, teacher, labels = make_inputs(64, 128256, torch.bfloat16, "cuda")
    rows, grad = run_kernel(backend, student, teacher, labels, 1 / 64, mode)
    assert_matches_reference(rows, grad, student, teacher, labels, 1 / 64, mode)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_more_than_2_31_elements(backend):
    # N*C > 2^31: the last rows start beyond int32 offsets (needs ~13 GB for s, t, grad).
    require(backend)
    c = 128256
    n = 2**31 // c + 8
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * c * 2 + (8 << 30):
        pytest.skip("not enough GPU memory for N*C > 2^31 in bfloat16")
    mode = MODES["rev_kl_T0.5_unscaled"]
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g)
    teacher = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g)
    rows, grad = run_kernel(backend, student, teacher, None, 0.37, mode)
    for sl in (slice(0, 2), slice(n - 3, n)):
        assert_matches_reference(rows[sl], grad[sl], student[sl], teacher[sl], None, 0.37, mode)
    del rows
    scale_kernel = torch.ops.lepton_fast.scale_grad_
    if backend == "triton":
        from lepton_fast.kernels.scale_grad import scale_grad_ as scale_kernel
    tail = grad[n - 1].float().clone()
    scale_kernel(grad, torch.tensor(2.0, device="cuda"))
    torch.testing.assert_close(grad[n - 1].float(), 2 * tail, atol=0, rtol=0)

