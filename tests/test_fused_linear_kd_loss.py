"""fused_linear_kd_loss on every row kernel (CPU C++, CUDA C++, Triton) against the float64 oracle.

The oracle is reference.fused_linear_kd_loss in float64: both heads projected in full, then
reference.fused_kd_loss, with autograd for the gradients of the student's hidden states,
weight and bias. Inputs are fresh random tensors; conftest fills every new buffer with NaN,
so a row or a gradient the op forgets to write shows. Cases marked `cuda` run on a GPU.
"""
import math

import pytest
import torch

from conftest import CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, TEMPERATURES, require
from fused_linear_common import (TOL, assert_compiled_matches, assert_no_buffer_of_n_by_v,
                                 assert_row_error_in_callers_terms, assert_second_backward_and_second_order_raise,
                                 assert_undefined_row_in_callers_terms, bind,
                                 gemm_shapes, projection_rows, randn, run)
from lepton_fast._validate import kd_hyper
from lepton_fast import fused_linear_kd_loss, reference
from lepton_fast.ops import linear_kd_loss
from lepton_fast.ops.kd_loss import SPEC

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
# Every divergence, and the generalized JSD at both ends (beta 0 = forward KL, 1 = reverse KL).
DIVERGENCE_BETAS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def make(n=7, h_s=12, h_t=9, v=37, v_t=None, *, seed=0, dtype=torch.float32, device="cpu", bias=True, lead=None,
         ignore_every=3, classes=None):
    """Student and teacher heads with logits of spread ~3, labels with every third row ignored."""
    v_t = v if v_t is None else v_t
    rows = (n,) if lead is None else lead
    x = dict(
        student_hidden=randn(*rows, h_s, seed=seed, dtype=dtype, device=device),
        student_weight=randn(v, h_s, seed=seed + 1, dtype=dtype, device=device, scale=3 / math.sqrt(h_s)),
        teacher_hidden=randn(*rows, h_t, seed=seed + 2, dtype=dtype, device=device),
        teacher_weight=randn(v_t, h_t, seed=seed + 3, dtype=dtype, device=device, scale=3 / math.sqrt(h_t)),
    )
    if bias:
        x["student_bias"] = randn(v, seed=seed + 4, dtype=dtype, device=device)
        x["teacher_bias"] = randn(v_t, seed=seed + 5, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed + 6)
    labels = torch.randint(0, classes or min(v, v_t), rows, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return x, labels.to(device)


ours, oracle, assert_matches = bind(fused_linear_kd_loss, reference.fused_linear_kd_loss)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_BETAS)
def test_matches_reference(divergence, beta, reduction, device, backend):
    # N = 7 rows in chunks of 3 (3 + 3 + 1: a ragged last chunk), H_s != H_t, biases, every
    # third row ignored, and the hard-label CE (alpha > 0) with label smoothing.
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=1)
    go = randn(7, seed=9, device=device) if reduction == "none" else None
    assert_matches(backend, x, go, temperature=2.0, divergence=divergence, beta=beta, labels=labels, alpha=0.3,
                   label_smoothing=0.1, reduction=reduction, chunk_size=3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_range(temperature, divergence, device, backend):
    """Every T of the documented range (1e-8 ... 1e4) against the float64 oracle, on logits of an
    LLM's size (~30; float64 above T = 100, as conftest.temperature_sweep_logits says why)."""
    require(SPEC, device, backend)
    dtype = torch.float32 if temperature <= 100 else torch.float64
    x, labels = make(device=device, seed=21, dtype=dtype)
    x = {k: t * 10 if k.endswith("weight") else t for k, t in x.items()}
    loss, grads = ours(backend, x, temperature=temperature, divergence=divergence, beta=0.3, labels=labels,
                       alpha=0.3, chunk_size=3)
    ref_loss, ref_grads = oracle(x, temperature=temperature, divergence=divergence, beta=0.3, labels=labels,
                                 alpha=0.3)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    for k, g in grads.items():
        torch.testing.assert_close(g.double(), ref_grads[k], rtol=1e-5, atol=1e-5 * ref_grads[k].abs().max().item())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_without_labels_or_bias(divergence, device, backend):
    require(SPEC, device, backend)
    x, _ = make(n=9, device=device, seed=2, bias=False)
    assert_matches(backend, x, temperature=0.7, divergence=divergence, chunk_size=4, scale_by_t2=False)
    x["student_bias"] = randn(37, seed=3, device=device)  # the student's bias alone
    assert_matches(backend, x, temperature=1.0, divergence=divergence, chunk_size=4)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_result_does_not_depend_on_chunk_size(device, backend):
    require(SPEC, device, backend)
    x, labels = make(n=11, device=device, seed=4)
    kw = dict(temperature=2.0, divergence="jsd", labels=labels, alpha=0.2)
    want_loss, want_grads = ours(backend, x, chunk_size=11, **kw)
    for chunk in (1, 2, 3, 5, 100, None):
        loss, grads = ours(backend, x, chunk_size=chunk, **kw)
        torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
        for k in grads:
            torch.testing.assert_close(grads[k], want_grads[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction, device, backend):
    require(SPEC, device, backend)
    x, _ = make(n=5, device=device, seed=5)
    labels = torch.full((5,), -100, device=device)
    loss, grads = ours(backend, x, labels=labels, alpha=0.5, reduction=reduction, chunk_size=2)
    assert (loss == 0).all()
    for g in grads.values():
        assert (g == 0).all()


def test_ignored_rows_cost_nothing_on_the_cpu():
    # The GEMMs see the valid rows only: with 2 of 9 rows valid each head's logits GEMM has 2
    # rows, and with none valid no GEMM runs at all. Labels are host memory: no synchronisation.
    require(SPEC, "cpu", "cpu")
    x, _ = make(n=9, device="cpu", seed=6)
    labels = torch.full((9,), -100)
    labels[[2, 7]] = torch.tensor([4, 30])
    shapes = gemm_shapes(lambda: ours("cpu", x, labels=labels, chunk_size=4))
    assert projection_rows(shapes, (12, 9)) == [2, 2], shapes
    assert len(shapes) == 4  # and the two gradient GEMMs
    assert gemm_shapes(lambda: ours("cpu", x, labels=torch.full((9,), -100))) == []


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_vocab_size_cuts_both_heads(device, backend):
    # A student head padded to 40 rows, the teacher's to 43: the shared vocabulary is 37.
    require(SPEC, device, backend)
    x, labels = make(v=40, v_t=43, device=device, seed=7, classes=37)
    loss, grads = assert_matches(backend, x, temperature=2.0, labels=labels, alpha=0.3, vocab_size=37, chunk_size=3)
    assert (grads["student_weight"][37:] == 0).all() and (grads["student_bias"][37:] == 0).all()
    with pytest.raises(ValueError, match=r"V=40.*V_t=43"):
        fused_linear_kd_loss(**x, backend=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_softcap_and_logit_scale(divergence, device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=8)
    kw = dict(temperature=1.5, divergence=divergence, labels=labels, alpha=0.25, chunk_size=3)
    assert_matches(backend, x, student_logit_scale=0.5, teacher_logit_scale=2.0, student_softcap=2.5,
                   teacher_softcap=30.0, **kw)
    assert_matches(backend, x, student_logit_scale=1.7, student_softcap=None, teacher_softcap=4.0, **kw)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batch_time_hidden(device, backend):
    # [B, T, H] hidden states and [B, T] labels: "none" gives [B, T], "mean" a scalar.
    require(SPEC, device, backend)
    x, labels = make(lead=(2, 5), device=device, seed=10)
    loss, _ = assert_matches(backend, x, randn(2, 5, seed=11, device=device), temperature=2.0, labels=labels,
                             alpha=0.5, reduction="none", chunk_size=4)
    assert loss.shape == (2, 5) and (loss[labels == -100] == 0).all()
    assert_matches(backend, x, temperature=2.0, labels=labels, divergence="reverse_kl", chunk_size=4)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_num_items_in_batch_divides_the_sum(reduction, device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=12)
    for count in (13, torch.tensor(13.0, device=device)):
        loss, grads = assert_matches(backend, x, temperature=2.0, labels=labels, reduction=reduction,
                                     num_items_in_batch=count, chunk_size=3)
        total, total_grads = ours(backend, x, temperature=2.0, labels=labels, reduction="sum", chunk_size=3)
        torch.testing.assert_close(loss, total / 13, **TOL)
        for k in grads:
            torch.testing.assert_close(grads[k], total_grads[k] / 13, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_output_not_one_and_partial_requires_grad(device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=13)
    kw = dict(temperature=2.0, divergence="jsd", labels=labels, chunk_size=3)
    assert_matches(backend, x, torch.tensor(-2.5, device=device), **kw)
    # A frozen lm_head (weight and bias constant): only the hidden states get a gradient.
    h = x["student_hidden"].clone().requires_grad_()
    fused_linear_kd_loss(h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                         student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], backend=backend,
                         **kw).backward()
    _, want = oracle(x, **kw)
    torch.testing.assert_close(h.grad.double(), want["student_hidden"], **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_loss_without_grad_is_the_same(device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=14)
    with torch.no_grad():
        loss = fused_linear_kd_loss(**x, temperature=2.0, labels=labels, reduction="none", chunk_size=3,
                                    backend=backend)
    ref, _ = oracle(x, temperature=2.0, labels=labels, reduction="none")
    torch.testing.assert_close(loss.double(), ref, **TOL)


# --- bfloat16 / float16 --------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, device, backend):
    """bfloat16/float16 heads: the logits come out of the GEMM in float32, so the loss has the
    float32 tolerance; a gradient is rounded to the dtype once (the CPU widens the GEMM
    operands) or, on a GPU, also enters the d hidden / d weight GEMMs rounded: its error is
    bounded by u * (|dL/dz| @ |W|) for d hidden (u the unit roundoff) plus the final rounding.
    Measured on the CPU (N=64, V=300, H=48, this seed): the largest error is 0.25-0.32 of
    that bound, 0.14-0.24 % of the largest gradient in bfloat16 and 0.02-0.04 % in float16;
    the loss is within 2e-7 of the oracle."""
    require(SPEC, device, backend)
    x, labels = make(n=64, h_s=48, h_t=40, v=300, device=device, seed=15, dtype=dtype)
    kw = dict(temperature=2.0, divergence="jsd", labels=labels, alpha=0.3)
    loss, grads = ours(backend, x, chunk_size=24, **kw)
    ref_loss, ref_grads = oracle(x, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-4)
    u = UNIT_ROUNDOFF[dtype]
    # dL/dz from the oracle, to bound the GEMMs' error: project again in float64.
    x64 = {k: t.double() for k, t in x.items()}
    z = reference.lm_head_logits(x64["student_hidden"], x64["student_weight"], x64["student_bias"]).requires_grad_()
    zt = reference.lm_head_logits(x64["teacher_hidden"], x64["teacher_weight"], x64["teacher_bias"])
    (dz,) = torch.autograd.grad(reference.fused_kd_loss(z, zt, **kw), z)
    bounds = {
        "student_hidden": 2 * u * (dz.abs() @ x64["student_weight"].abs()) + u * ref_grads["student_hidden"].abs(),
        "student_weight": 2 * u * (dz.abs().T @ x64["student_hidden"].abs()) + u * ref_grads["student_weight"].abs(),
        "student_bias": 2 * u * dz.abs().sum(0) + u * ref_grads["student_bias"].abs(),
    }
    for k, g in grads.items():
        assert g.dtype == dtype
        err = (g.double() - ref_grads[k]).abs()
        assert (err <= bounds[k] + 1e-12).all(), (k, (err / bounds[k]).max().item())
        assert err.max() > 0  # the dtype does round: the bound is not vacuous


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_teacher_head_of_another_dtype(device, backend):
    # A bfloat16 student distilled from a float32 teacher: each head multiplies in its own
    # dtype, both logits in float32; the student's gradients come back in bfloat16.
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=22)
    for k in ("student_hidden", "student_weight", "student_bias"):
        x[k] = x[k].bfloat16()
    loss, grads = ours(backend, x, temperature=2.0, labels=labels, chunk_size=3)
    ref_loss, ref_grads = oracle(x, temperature=2.0, labels=labels)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for k, g in grads.items():
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), ref_grads[k], atol=2**-7 * ref_grads[k].abs().max().item(), rtol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autocast_casts_each_head_as_f_linear_would(device, backend):
    """Liger-Kernel's test_amp case: under autocast a bfloat16 hidden state meets a float32
    lm_head. Each head computes in autocast's dtype, as F.linear would, and the float32 weight
    gets its gradient through the cast (oracle: the same casts, then reference.py in float64)."""
    require(SPEC, device, backend)
    x, labels = make(n=6, seed=31, device=device)
    x["student_hidden"] = x["student_hidden"].bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, grads = ours(backend, x, labels=labels, alpha=0.2, temperature=2.0)
    assert loss.dtype == torch.float32 and grads["student_weight"].dtype == torch.float32

    def cast_then_reference(**a):
        for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"):
            a[k] = a[k].bfloat16().double()
        return reference.fused_linear_kd_loss(**a, labels=labels, alpha=0.2, temperature=2.0)

    ref_loss, ref_grads = run(cast_then_reference, {k: t.double() for k, t in x.items()})
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-4)
    for k, g in grads.items():
        # the gradient of the bfloat16 hidden state comes back rounded to bfloat16
        tol = 2**-7 * ref_grads[k].abs().max().item() if g.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(g.double(), ref_grads[k], atol=tol, rtol=1e-2 if tol != 1e-4 else 1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")
    with pytest.raises(TypeError, match="student_weight is torch.float32 but student_hidden is torch.bfloat16"):
        fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                             backend=backend)


# --- torch.compile, opcheck, memory ---------------------------------------------------------------


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    require(SPEC, device, device)
    torch._dynamo.reset()
    x, labels = make(lead=(2, 4), device=device, seed=16)

    def step(**a):
        return fused_linear_kd_loss(**a, temperature=2.0, divergence="jsd", labels=labels, alpha=0.2,
                                    student_softcap=5.0, chunk_size=3) * 2

    assert_compiled_matches(step, x)
    # Dynamic shapes: the token count changes between calls, the chunk size is chosen inside.
    for n in (5, 9):
        x, labels = make(n=n, device=device, seed=16 + n)

        def step_n(**a):
            return fused_linear_kd_loss(**a, divergence="reverse_kl", labels=labels, student_logit_scale=0.5)

        assert_compiled_matches(step_n, x, dynamic=True)


def _op_args(device, requires_grad):
    x, labels = make(n=5, device=device, seed=17)
    sh = x["student_hidden"].requires_grad_(requires_grad)
    sw = x["student_weight"].requires_grad_(requires_grad)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    common = dict(temperature=2.0, alpha=0.3, label_smoothing=0.1)
    return [
        (sh, sw, x["teacher_hidden"], x["teacher_weight"], x["student_bias"], x["teacher_bias"], labels,
         kd_hyper(divergence="jsd", **common), -100, "mean", None, 37, 1.0, 1.0, None, None, 2, None, requires_grad,
         requires_grad, False, False),
        (sh, sw, x["teacher_hidden"], x["teacher_weight"], None, None, None,
         kd_hyper(divergence="reverse_kl", scale_by_t2=False), -100, "none", None, 30, 0.5, 2.0, 3.0, None, 3, None,
         False, False, False, True),
        (sh, sw, x["teacher_hidden"], x["teacher_weight"], None, x["teacher_bias"], labels, kd_hyper(**common), -100,
         "sum", f64(4.0), 37, 1.0, 1.0, None, 10.0, 5, None, requires_grad, requires_grad, False, True),
    ]


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    """The custom op's schema, fake kernel, autograd registration and AOT dispatch."""
    require(SPEC, device, device)
    for requires_grad in (True, False):
        for args in _op_args(device, requires_grad):
            torch.library.opcheck(torch.ops.lepton_fast.fused_linear_kd_loss.default, args)


def test_no_buffer_of_n_by_v_elements():
    """With N = 256 rows in chunks of 16 nothing as large as N x V bytes (a bool [N, V]) is
    allocated, forward and backward together."""
    require(SPEC, "cpu", "cpu")
    n, v = 256, 500
    x, labels = make(n=n, h_s=24, h_t=16, v=v, seed=18)
    assert_no_buffer_of_n_by_v(lambda: ours("cpu", x, temperature=2.0, divergence="jsd", labels=labels, alpha=0.3,
                                            chunk_size=16), n, v, 16)


def test_auto_chunk_size_follows_the_budget(monkeypatch):
    require(SPEC, "cpu", "cpu")
    x, labels = make(n=40, seed=19)
    monkeypatch.setitem(linear_kd_loss.CHUNK_BUDGET_BYTES, "cpu", 37 * 12 * 8)  # 8 rows of float32 buffers
    rows = projection_rows(gemm_shapes(lambda: ours("cpu", x, labels=labels)), (12, 9))
    assert rows == [8, 8, 8, 8, 8, 8, 2, 2], rows  # 26 valid rows: 8 + 8 + 8 + 2, two heads each
    want, _ = oracle(x, labels=labels)
    torch.testing.assert_close(ours("cpu", x, labels=labels)[0].double(), want, **TOL)


# --- errors --------------------------------------------------------------------------------------


def _bad_inputs():
    x, _ = make(n=4, seed=20)
    yield "V != V_t", dict(teacher_weight=randn(30, 9, seed=1), teacher_bias=randn(30, seed=2)), ValueError, \
        "V=37.*V_t=30"
    yield "vocab_size too big", dict(vocab_size=38), ValueError, "vocab_size"
    yield "vocab_size 0", dict(vocab_size=0), ValueError, "vocab_size"
    yield "weight H", dict(student_weight=randn(37, 11, seed=1)), ValueError, "student_weight"
    yield "weight dtype", dict(student_weight=x["student_weight"].double()), TypeError, "student_weight"
    yield "int hidden", dict(student_hidden=torch.ones(4, 12, dtype=torch.long)), TypeError, "student_hidden"
    yield "teacher rows", dict(teacher_hidden=randn(5, 9, seed=1)), ValueError, "teacher_hidden"
    yield "bias shape", dict(student_bias=randn(36, seed=1)), ValueError, "student_bias"
    yield "chunk_size 0", dict(chunk_size=0), ValueError, "chunk_size"
    yield "softcap 0", dict(student_softcap=0.0), ValueError, "student_softcap"
    yield "scale nan", dict(teacher_logit_scale=math.nan), ValueError, "teacher_logit_scale"
    yield "temperature", dict(temperature=-1.0), ValueError, "temperature"
    yield "labels range", dict(labels=torch.tensor([0, 37, 1, 2])), ValueError, "labels"
    yield "labels shape", dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"
    yield "alpha without labels", dict(alpha=0.5), ValueError, "labels"
    yield "num_items with none", dict(num_items_in_batch=3, reduction="none"), ValueError, "num_items_in_batch"


BAD = list(_bad_inputs())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("what,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, change, error, match, backend):
    if backend != "reference":
        require(SPEC, "cpu", backend)
    x, _ = make(n=4, seed=20)
    x.update(change)
    with pytest.raises(error, match=match):
        fused_linear_kd_loss(**x, backend=backend)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
@pytest.mark.parametrize("ignore_every", [0, 3], ids=["every row", "ignored rows"])
def test_a_label_out_of_range_is_reported_in_the_callers_terms(ignore_every, device, backend):
    # 10 rows in chunks of 3: row 8 is the third of the third chunk, or, with rows 0, 3, 6, 9
    # ignored (left out before the chunks on the CPU), the third of the second.
    require(SPEC, device, backend)
    x, labels = make(n=10, seed=21, ignore_every=ignore_every)
    labels[8] = 37
    assert_row_error_in_callers_terms(
        lambda: fused_linear_kd_loss(**x, labels=labels, alpha=0.5, chunk_size=3, backend=backend),
        "fused_linear_kd_loss", "labels", 8, backend)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
def test_an_undefined_row_is_reported_in_the_callers_terms(device, backend):
    require(SPEC, device, backend)
    x, _ = make(n=10, seed=22)
    assert_undefined_row_in_callers_terms(fused_linear_kd_loss, x, "fused_linear_kd_loss", backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_second_backward_and_second_order_raise(device, backend):
    require(SPEC, device, backend)
    x, _ = make(n=4, device=device, seed=21)
    w = x["student_weight"].clone().requires_grad_()
    assert_second_backward_and_second_order_raise(lambda: fused_linear_kd_loss(
        x["student_hidden"], w, x["teacher_hidden"], x["teacher_weight"], 2.0, backend=backend), w)
