"""fused_linear_sparse_kd_loss on every row kernel (CPU C++, Triton, the reference kernel; CUDA
cases on a GPU) against the float64 oracle.

The oracle is reference.fused_linear_sparse_kd_loss in float64: the student's head projected in
full, then reference.sparse_kd_loss, with autograd for the gradients of the hidden states,
weight and bias. Inputs are fresh random tensors; conftest fills every new buffer with NaN, so
a row or a gradient the op forgets to write shows.
"""
import math

import pytest
import torch

from axolotl_kd import AxolotlChunkedTopKLoss, axolotl_collated_logprobs
from conftest import CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, assert_close_to_oracle, require
from fused_linear_common import (TOL, as_float64, assert_compiled_matches, assert_no_buffer_of_n_by_v,
                                 assert_row_error_in_callers_terms, assert_second_backward_and_second_order_raise,
                                 assert_undefined_row_in_callers_terms, bind,
                                 gemm_shapes, projection_rows, randn, run)
from lepton_fast._validate import kd_hyper
from lepton_fast import fused_linear_sparse_kd_loss, reference
from lepton_fast.ops import linear_kd_loss
from lepton_fast.ops.sparse_kd_loss import SPEC

# The interpreter evaluates both sides of tl.where with numpy, which warns about the masked lanes.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
TRUNCATIONS = ["renormalize", "tail"]


def make(n=7, h=12, v=37, k=5, *, seed=0, dtype=torch.float32, device="cpu", bias=True, lead=None, ignore_every=3,
         teacher="top_k", classes=None):
    """A student head with logits of spread ~3, a teacher's top-k (shuffled) log-probabilities of
    another random distribution, and labels with every ``ignore_every``-th row ignored; teacher
    and labels over the first ``classes`` (default: all v) classes.

    teacher="messy": each row repeats an index (the later copy with another value), masks an
    entry holding an out-of-range index and a NaN, and row 1 has every entry masked."""
    rows = (n,) if lead is None else lead
    x = dict(student_hidden=randn(*rows, h, seed=seed, dtype=dtype, device=device),
             student_weight=randn(v, h, seed=seed + 1, dtype=dtype, device=device, scale=3 / math.sqrt(h)))
    if bias:
        x["student_bias"] = randn(v, seed=seed + 2, dtype=dtype, device=device)
    n_rows = math.prod(rows)
    teacher_logits = randn(n_rows, classes or v, seed=seed + 3, dtype=torch.float64, scale=3.0)
    logp, idx = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 4))
    logp, idx = logp[:, order], idx[:, order]
    mask = None
    if teacher == "messy":
        assert k >= 4
        idx[:, 2] = idx[:, 0]
        logp[:, 2] = logp[:, 0] - 1.0  # a repeated index counts once, at its first occurrence
        idx[:, 3], logp[:, 3] = v + 5, math.nan
        mask = torch.ones(n_rows, k, dtype=torch.bool)
        mask[:, 3] = False
        mask[1] = False
    x["teacher_indices"] = idx.reshape(*rows, k).to(device)
    x["teacher_logprobs"] = logp.reshape(*rows, k).to(dtype).to(device)
    x["teacher_mask"] = None if mask is None else mask.reshape(*rows, k).to(device)
    labels = torch.randint(0, classes or v, rows, generator=torch.Generator().manual_seed(seed + 5))
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return x, labels.to(device)


ours, oracle, assert_matches = bind(fused_linear_sparse_kd_loss, reference.fused_linear_sparse_kd_loss)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(divergence, truncation, reduction, device, backend):
    # N = 7 rows in chunks of 3 (3 + 3 + 1: a ragged last chunk), a bias, every third row
    # ignored, the hard-label CE with label smoothing; duplicate, masked (out-of-range index,
    # NaN value) entries and a row with every entry masked.
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=1, teacher="messy")
    go = randn(7, seed=9, device=device) if reduction == "none" else None
    loss, _ = assert_matches(backend, x, go, temperature=2.0, divergence=divergence, beta=0.3, truncation=truncation,
                             labels=labels, alpha=0.3, label_smoothing=0.1, reduction=reduction, chunk_size=3)
    if reduction == "none":
        assert (loss[labels == -100] == 0).all() and (loss[labels != -100] > 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("k", [1, 37], ids=["K=1", "K=V"])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_entry_and_every_class_listed(divergence, truncation, k, device, backend):
    require(SPEC, device, backend)
    x, _ = make(k=k, device=device, seed=2, bias=False)
    loss, grads = assert_matches(backend, x, temperature=1.5, divergence=divergence, truncation=truncation,
                                 reduction="none", chunk_size=4)
    if k == 1 and truncation == "renormalize":  # both sides are the one class
        assert (loss == 0).all() and all((g == 0).all() for g in grads.values())
    else:
        assert (loss > 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_or_masked(reduction, device, backend):
    # Ignored rows (labels) and rows without an entry (mask): zero loss and gradient; masked
    # rows still count in "mean" (the hard-label term has them).
    require(SPEC, device, backend)
    x, _ = make(n=5, device=device, seed=3)
    loss, grads = ours(backend, x, labels=torch.full((5,), -100, device=device), alpha=0.5, reduction=reduction,
                       chunk_size=2)
    assert (loss == 0).all() and all((g == 0).all() for g in grads.values())
    x["teacher_mask"] = torch.zeros(5, 5, dtype=torch.bool, device=device)
    for truncation in TRUNCATIONS:
        loss, grads = ours(backend, x, reduction=reduction, truncation=truncation, chunk_size=2)
        assert (loss == 0).all() and all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_num_items_in_batch_divides_the_sum(reduction, device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=4)
    kw = dict(temperature=2.0, truncation="tail", labels=labels, alpha=0.2, chunk_size=3)
    total, total_grads = ours(backend, x, reduction="sum", **kw)
    for count in (13, torch.tensor(13.0, device=device)):
        loss, grads = assert_matches(backend, x, reduction=reduction, num_items_in_batch=count, **kw)
        torch.testing.assert_close(loss, total / 13, **TOL)
        for k in grads:
            torch.testing.assert_close(grads[k], total_grads[k] / 13, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_result_does_not_depend_on_chunk_size(device, backend):
    require(SPEC, device, backend)
    x, labels = make(n=11, device=device, seed=5, teacher="messy")
    kw = dict(temperature=2.0, divergence="jsd", truncation="tail", labels=labels, alpha=0.2)
    want_loss, want_grads = ours(backend, x, chunk_size=11, **kw)
    for chunk in (1, 2, 3, 5, 100, None):
        loss, grads = ours(backend, x, chunk_size=chunk, **kw)
        torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
        for k in grads:
            torch.testing.assert_close(grads[k], want_grads[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_leading_dims_softcap_scale_and_padded_head(device, backend):
    # [2, 5] tokens, Gemma-2's softcap and a logit scale, and a head padded to 40 rows of which
    # the first 37 are the vocabulary: the padded rows take no part and get no gradient.
    require(SPEC, device, backend)
    x, labels = make(v=40, lead=(2, 5), device=device, seed=6, classes=37)
    kw = dict(temperature=2.0, divergence="reverse_kl", truncation="tail", labels=labels, alpha=0.3,
              student_logit_scale=0.7, student_softcap=4.0, vocab_size=37, chunk_size=4)
    loss, grads = assert_matches(backend, x, randn(2, 5, seed=7, device=device), reduction="none", **kw)
    assert loss.shape == (2, 5)
    assert (grads["student_weight"][37:] == 0).all() and (grads["student_bias"][37:] == 0).all()
    assert (grads["student_weight"][:37] != 0).any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_output_frozen_head_and_no_grad(device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=8)
    kw = dict(temperature=2.0, divergence="jsd", labels=labels, chunk_size=3)
    assert_matches(backend, x, torch.tensor(-2.5, device=device), **kw)
    # A frozen lm_head (weight and bias constant): only the hidden states get a gradient.
    h = x["student_hidden"].clone().requires_grad_()
    fused_linear_sparse_kd_loss(h, x["student_weight"], x["teacher_indices"], x["teacher_logprobs"],
                                student_bias=x["student_bias"], backend=backend, **kw).backward()
    _, want = oracle(x, **kw)
    torch.testing.assert_close(h.grad.double(), want["student_hidden"], **TOL)
    with torch.no_grad():
        loss = fused_linear_sparse_kd_loss(**x, reduction="none", backend=backend, **kw)
    ref, _ = oracle(x, reduction="none", **kw)
    torch.testing.assert_close(loss.double(), ref, **TOL)


# --- bfloat16, mixed precision, float64 ----------------------------------------------------------


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_bfloat16(truncation, device, backend):
    """A bfloat16 head and bfloat16 logprobs: the logits come out of the GEMM in float32, so the
    loss has float32's tolerance; each gradient is rounded to bfloat16 (on a GPU its GEMM
    operands too): within 2^-7 of the largest."""
    require(SPEC, device, backend)
    x, labels = make(n=16, h=24, v=60, k=8, device=device, seed=10, dtype=torch.bfloat16, teacher="messy")
    kw = dict(temperature=2.0, divergence="jsd", truncation=truncation, labels=labels, alpha=0.3)
    loss, grads = ours(backend, x, chunk_size=6, **kw)
    ref_loss, ref_grads = oracle(x, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-4)
    for k, g in grads.items():
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), ref_grads[k], atol=2**-7 * ref_grads[k].abs().max().item(), rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autocast_mixed_precision(device, backend):
    """A bfloat16 hidden state meets a float32 lm_head under autocast: the head computes in
    bfloat16, as F.linear would, and the float32 weight and bias get float32 gradients through
    the cast (oracle: the same casts, then reference.py in float64)."""
    require(SPEC, device, backend)
    x, labels = make(n=6, device=device, seed=11)
    x["student_hidden"] = x["student_hidden"].bfloat16()
    kw = dict(labels=labels, alpha=0.2, temperature=2.0, truncation="tail")
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, grads = ours(backend, x, **kw)
    assert loss.dtype == torch.float32 and grads["student_weight"].dtype == torch.float32

    def cast_then_reference(**a):
        for k in ("student_hidden", "student_weight"):
            a[k] = a[k].bfloat16().double()
        return reference.fused_linear_sparse_kd_loss(**a, **kw)

    ref_loss, ref_grads = run(cast_then_reference, as_float64(x))
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-4)
    for k, g in grads.items():
        # the gradient of the bfloat16 hidden state comes back rounded to bfloat16
        tol = 2**-7 * ref_grads[k].abs().max().item() if g.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(g.double(), ref_grads[k], atol=tol, rtol=1e-2 if tol != 1e-4 else 1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")
    with pytest.raises(TypeError, match="student_weight is torch.float32 but student_hidden is torch.bfloat16"):
        fused_linear_sparse_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_indices"],
                                    x["teacher_logprobs"], backend=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_float64(device, backend):
    require(SPEC, device, backend)
    x, labels = make(device=device, seed=12, dtype=torch.float64, teacher="messy")
    assert_matches(backend, x, tol=dict(atol=1e-10, rtol=1e-10), temperature=0.7, divergence="reverse_kl",
                   truncation="tail", labels=labels, alpha=0.1, chunk_size=2)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("normalize_topk", [True, False])
def test_axolotl_chunked_top_k_drop_in(normalize_topk, device, backend):
    # axolotl's fused-linear trainer loss (kernels/liger.py, transcribed in tests/axolotl_kd.py)
    # on its input format, in float64: the collator's log-probabilities at T (renormalised over
    # the K entries, so normalize_topk=False is "tail" with no teacher tail), whole positions
    # masked, the sum over chunks divided by num_items_in_batch as its model forward does.
    require(SPEC, device, backend)
    x, _ = make(device=device, seed=13, dtype=torch.float64, bias=False)
    t, num_items = 2.0, 4
    stored = x["teacher_logprobs"] - x["teacher_logprobs"].logsumexp(-1, keepdim=True)
    collated = axolotl_collated_logprobs(stored, t)
    mask = torch.ones_like(x["teacher_indices"])
    mask[[0, 4]] = 0
    want = run(lambda student_hidden, student_weight, teacher_indices, **_: AxolotlChunkedTopKLoss.apply(
        student_hidden, student_weight, teacher_indices, collated, mask, t, normalize_topk, 3) / num_items, x)
    got = ours(backend, dict(x, teacher_logprobs=stored, teacher_mask=mask), temperature=t, reduction="sum",
               truncation="renormalize" if normalize_topk else "tail", num_items_in_batch=num_items, chunk_size=3)
    assert_close_to_oracle(got, want, x, dict(atol=1e-10, rtol=1e-10))


# --- torch.compile, opcheck, memory ---------------------------------------------------------------


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    require(SPEC, device, "cpu" if device == "cpu" else "triton")
    torch._dynamo.reset()
    x, labels = make(lead=(2, 4), device=device, seed=13, teacher="messy")

    def step(**a):
        return fused_linear_sparse_kd_loss(**a, temperature=2.0, divergence="jsd", truncation="tail", labels=labels,
                                           alpha=0.2, student_softcap=5.0, chunk_size=3) * 2

    assert_compiled_matches(step, x)
    # Dynamic shapes: the token count changes between calls, the chunk size is chosen inside.
    for n in (5, 9):
        x, labels = make(n=n, device=device, seed=13 + n)

        def step_n(**a):
            return fused_linear_sparse_kd_loss(**a, divergence="reverse_kl", labels=labels, reduction="none").sum()

        assert_compiled_matches(step_n, x, dynamic=True)


def _op_args(device, requires_grad):
    x, labels = make(n=5, device=device, seed=14, teacher="messy")
    sh = x["student_hidden"].requires_grad_(requires_grad)
    sw = x["student_weight"].requires_grad_(requires_grad)
    teacher = (x["teacher_indices"], x["teacher_logprobs"], x["teacher_mask"])
    plain, _ = make(n=5, device=device, seed=15)  # a teacher without a mask
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    common = dict(temperature=2.0, alpha=0.3, label_smoothing=0.1)
    return [
        (sh, sw, x["student_bias"], *teacher, labels, kd_hyper(divergence="jsd", **common), "tail", -100, "mean",
         None, 37, 1.0, None, 2, None, requires_grad, requires_grad, False),
        (sh, sw, None, plain["teacher_indices"], plain["teacher_logprobs"].double(), None, None,
         kd_hyper(divergence="reverse_kl", scale_by_t2=False), "renormalize", -100, "none", None, 37, 0.5, 3.0, 3,
         None, False, False, False),
        (sh, sw, x["student_bias"], *teacher, labels, kd_hyper(**common), "renormalize", -100, "sum", f64(4.0), 37,
         1.0, 10.0, 5, None, requires_grad, requires_grad, requires_grad),
    ]


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    """The custom op's schema, fake kernel, autograd registration and AOT dispatch."""
    require(SPEC, device, "cpu" if device == "cpu" else "triton")
    for requires_grad in (True, False):
        for args in _op_args(device, requires_grad):
            torch.library.opcheck(torch.ops.lepton_fast.fused_linear_sparse_kd_loss.default, args)


def test_no_buffer_of_n_by_v_elements():
    """With N = 256 rows in chunks of 16 nothing as large as N x V bytes (a bool [N, V]) is
    allocated, forward and backward together."""
    require(SPEC, "cpu", "cpu")
    n, v = 256, 500
    x, labels = make(n=n, h=24, v=v, k=16, seed=15)
    assert_no_buffer_of_n_by_v(lambda: ours("cpu", x, temperature=2.0, truncation="tail", labels=labels, alpha=0.3,
                                            chunk_size=16), n, v, 16)


def test_auto_chunk_size_follows_the_budget(monkeypatch):
    # Two float32 buffers per row (the logits and the row gradient; no teacher head): a budget
    # of 8 rows of them cuts the 26 valid rows into 8 + 8 + 8 + 2.
    require(SPEC, "cpu", "cpu")
    x, labels = make(n=40, seed=16)
    monkeypatch.setitem(linear_kd_loss.CHUNK_BUDGET_BYTES, "cpu", 37 * 8 * 8)
    rows = projection_rows(gemm_shapes(lambda: ours("cpu", x, labels=labels)), (12,))
    assert rows == [8, 8, 8, 2], rows
    want, _ = oracle(x, labels=labels)
    torch.testing.assert_close(ours("cpu", x, labels=labels)[0].double(), want, **TOL)


# --- errors --------------------------------------------------------------------------------------


def _bad_inputs():
    x, _ = make(n=4, seed=17)
    idx, logp = x["teacher_indices"], x["teacher_logprobs"]
    yield "weight H", dict(student_weight=randn(37, 11, seed=1)), ValueError, "student_weight"
    yield "weight dtype", dict(student_weight=x["student_weight"].double()), TypeError, "student_weight"
    yield "int hidden", dict(student_hidden=torch.ones(4, 12, dtype=torch.long)), TypeError, "student_hidden"
    yield "bias shape", dict(student_bias=randn(36, seed=1)), ValueError, "student_bias"
    yield "indices rows", dict(teacher_indices=idx[:3]), ValueError, "teacher_indices must have shape"
    yield "indices dtype", dict(teacher_indices=idx.float()), TypeError, "teacher_indices"
    yield "K = 0", dict(teacher_indices=idx[:, :0], teacher_logprobs=logp[:, :0]), ValueError, "teacher_indices"
    yield "logprobs shape", dict(teacher_logprobs=logp[:, :-1]), ValueError, "teacher_logprobs"
    yield "logprobs dtype", dict(teacher_logprobs=idx), TypeError, "teacher_logprobs"
    yield "mask dtype", dict(teacher_mask=torch.ones_like(logp)), TypeError, "teacher_mask"
    yield "index out of range", dict(teacher_indices=idx.clone().fill_(37)), ValueError, "teacher_indices"
    yield "NaN logprob", dict(teacher_logprobs=logp.clone().fill_(math.nan)), ValueError, "teacher_logprobs"
    yield "truncation", dict(truncation="other_bucket"), ValueError, "truncation"
    yield "divergence", dict(divergence="kl"), ValueError, "divergence"
    yield "vocab_size too big", dict(vocab_size=38), ValueError, "vocab_size"
    yield "chunk_size 0", dict(chunk_size=0), ValueError, "chunk_size"
    yield "softcap 0", dict(student_softcap=0.0), ValueError, "student_softcap"
    yield "scale nan", dict(student_logit_scale=math.nan), ValueError, "student_logit_scale"
    yield "temperature", dict(temperature=-1.0), ValueError, "temperature"
    yield "labels range", dict(labels=torch.tensor([0, 37, 1, 2])), ValueError, "labels"
    yield "labels shape", dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"
    yield "alpha without labels", dict(alpha=0.5), ValueError, "labels"
    yield "num_items with none", dict(num_items_in_batch=3, reduction="none"), ValueError, "num_items_in_batch"


BAD = list(_bad_inputs())


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("what,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, change, error, match, backend):
    require(SPEC, "cpu", backend)
    x, _ = make(n=4, seed=17)
    x.update(change)
    with pytest.raises(error, match=match):
        fused_linear_sparse_kd_loss(**x, backend=backend)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
@pytest.mark.parametrize("argument,row,labelled", [("teacher_indices", 7, False), ("teacher_indices", 7, True),
                                                   ("labels", 8, True)],
                         ids=["teacher_indices", "teacher_indices, ignored rows", "labels, ignored rows"])
def test_an_index_out_of_range_is_reported_in_the_callers_terms(argument, row, labelled, device, backend):
    # 10 rows in chunks of 3: rows 7 and 8 are in the third chunk, or, with rows 0, 3, 6, 9
    # ignored (left out before the chunks on the CPU), in the second.
    require(SPEC, device, backend)
    x, labels = make(n=10, seed=21)
    if argument == "teacher_indices":
        x["teacher_indices"] = x["teacher_indices"].clone()
        x["teacher_indices"][row, 2] = 37
    else:
        labels[row] = 37
    kw = dict(labels=labels, alpha=0.5) if labelled else {}
    assert_row_error_in_callers_terms(
        lambda: fused_linear_sparse_kd_loss(**x, **kw, chunk_size=3, backend=backend),
        "fused_linear_sparse_kd_loss", argument, row, backend)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
def test_an_undefined_row_is_reported_in_the_callers_terms(device, backend):
    require(SPEC, device, backend)
    x, _ = make(n=10, seed=22)
    assert_undefined_row_in_callers_terms(fused_linear_sparse_kd_loss, x, "fused_linear_sparse_kd_loss", backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_second_backward_and_second_order_raise(device, backend):
    require(SPEC, device, backend)
    x, _ = make(n=4, device=device, seed=18)
    w = x["student_weight"].clone().requires_grad_()
    args = (x["student_hidden"], w, x["teacher_indices"], x["teacher_logprobs"], None, 2.0)
    assert_second_backward_and_second_order_raise(lambda: fused_linear_sparse_kd_loss(*args, backend=backend), w)
