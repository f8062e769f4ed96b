"""sparse_kd_loss: the oracle (lepton_fast.reference) against independent dense computations,
and every kernel against the oracle in float64.

The dense checks: with every class listed once the teacher's entries are its whole
distribution, so both truncations are fused_kd_loss on the full teacher; with K < V the
buckets of each truncation are written out as logits of a [N, K] or [N, K + 1] fused_kd_loss
(the student's tail by boolean indexing, not the oracle's scatter).
"""
import math
import re

import pytest
import torch

from axolotl_kd import axolotl_collated_logprobs, axolotl_topk_forward_kl
from conftest import (CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, TEMPERATURES, TRITON_COLUMN_BLOCKS, assert_device_assertion,
                      low_precision_tolerance, opcheck_kernel, require, temperature_sweep_logits)
from lepton_fast._validate import kd_hyper
from lepton_fast import reference, sparse_kd_loss
from lepton_fast.ops.sparse_kd_loss import SPEC

# The interpreter evaluates both sides of tl.where with numpy, which warns about the
# -inf - -inf of masked lanes on the side that is thrown away.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
TRUNCATIONS = ["renormalize", "tail"]
TOL = dict(atol=1e-5, rtol=1e-5)
F64 = dict(atol=1e-10, rtol=1e-10)


def randn(*shape, seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def top_k_teacher(n, v, k, seed, *, shuffle=True):
    """(indices [n, k] int64, log-probabilities [n, k] float64, teacher logits [n, v]): a
    teacher's k most likely classes per row, in a random order unless ``shuffle`` is False."""
    t = randn(n, v, seed=seed)
    logp, idx = torch.log_softmax(t, -1).topk(k, -1)
    if shuffle:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1)).expand(n, k)
        logp, idx = logp.gather(1, order), idx.gather(1, order)
    return idx, logp, t


def loss_and_grad(fn, student, *args, grad_output=None, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, *args, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), s.grad


def dense_buckets(student, idx, logp, temperature, truncation):
    """(student, teacher) bucket logits at T = 1 whose softmax is the truncation's buckets at
    ``temperature``, for rows of distinct, all-valid entries."""
    z, lp = student / temperature, logp / temperature
    s_b, t_b = z.gather(1, idx), lp
    if truncation == "tail":
        outside = torch.ones_like(student, dtype=torch.bool).scatter(1, idx, False)
        s_rest = torch.stack([z[r][outside[r]].logsumexp(0) for r in range(len(z))])
        listed = logp.logsumexp(-1)
        t_b = torch.cat([lp - lp.logsumexp(-1, keepdim=True) + listed[:, None],
                         torch.log1p(-listed.exp())[:, None]], 1)
        s_b = torch.cat([s_b, s_rest[:, None]], 1)
    return s_b, t_b


# --- the oracle -------------------------------------------------------------------------------


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_oracle_every_class_listed_is_fused_kd_loss(divergence, temperature, truncation):
    n, v = 5, 23
    s = randn(n, v, seed=1)
    idx, logp, t = top_k_teacher(n, v, v, seed=2)
    kw = dict(divergence=divergence, beta=0.3)
    loss, grad = loss_and_grad(reference.sparse_kd_loss, s, idx, logp, None, temperature, truncation=truncation, **kw)
    ref_loss, ref_grad = loss_and_grad(reference.fused_kd_loss, s, t, temperature, **kw)
    torch.testing.assert_close(loss, ref_loss, **F64)
    torch.testing.assert_close(grad, ref_grad, **F64)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_oracle_top_k_is_fused_kd_loss_of_the_buckets(divergence, temperature, truncation):
    n, v, k = 6, 40, 7
    s = randn(n, v, seed=3)
    idx, logp, _ = top_k_teacher(n, v, k, seed=4)
    kw = dict(divergence=divergence, beta=0.7)
    loss, grad = loss_and_grad(reference.sparse_kd_loss, s, idx, logp, None, temperature, truncation=truncation,
                               reduction="none", **kw)

    def dense(student):
        s_b, t_b = dense_buckets(student, idx, logp, temperature, truncation)
        return temperature**2 * reference.fused_kd_loss(s_b, t_b, 1.0, scale_by_t2=False, reduction="none", **kw)

    ref_loss, ref_grad = loss_and_grad(dense, s)
    torch.testing.assert_close(loss, ref_loss, **F64)
    torch.testing.assert_close(grad, ref_grad, **F64)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_oracle_at_t1_tail_uses_the_logprobs_as_given(truncation):
    # The tail's teacher at T = 1 is exp(logprobs) itself; renormalize divides by their sum.
    n, v, k = 4, 30, 5
    s = randn(n, v, seed=5)
    idx, logp, _ = top_k_teacher(n, v, k, seed=6)
    counted = torch.ones_like(idx, dtype=torch.bool)
    t_b, _ = reference.sparse_buckets(s, idx, logp, counted, temperature=1.0, truncation=truncation)
    expected = logp if truncation == "tail" else logp - logp.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(t_b[:, :k], expected, **F64)
    if truncation == "tail":
        torch.testing.assert_close(t_b[:, k].exp(), 1 - logp.exp().sum(-1), **F64)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_oracle_masked_and_duplicate_entries_are_left_out(divergence, truncation):
    # Masked entries may hold any index and any value; a repeated index counts once, at its
    # first unmasked occurrence: the loss is that of the distinct unmasked entries alone.
    n, v, k = 4, 31, 6
    s = randn(n, v, seed=7)
    idx, logp, _ = top_k_teacher(n, v, k, seed=8)
    kw = dict(temperature=2.0, divergence=divergence, truncation=truncation, reduction="none")
    expected, expected_grad = loss_and_grad(reference.sparse_kd_loss, s, idx, logp, None, **kw)
    pad = 4
    idx_x = torch.cat([idx, idx[:, :1], torch.full((n, 1), -7), idx[:, 2:3], torch.full((n, 1), v + 3)], 1)
    logp_x = torch.cat([logp, logp[:, :1] - 1.0, torch.full((n, 1), math.nan), logp[:, 2:3],
                        torch.zeros(n, 1)], 1)
    mask = torch.ones(n, k + pad, dtype=torch.bool)
    mask[:, k + 1] = mask[:, k + 3] = False  # the out-of-range and NaN entries
    assert idx_x.shape == (n, k + pad)
    loss, grad = loss_and_grad(reference.sparse_kd_loss, s, idx_x, logp_x, mask, **kw)
    torch.testing.assert_close(loss, expected, **F64)
    torch.testing.assert_close(grad, expected_grad, **F64)
    # A duplicate after a masked first occurrence is the one that counts.
    mask2 = torch.ones(n, k + 1, dtype=torch.bool)
    mask2[:, 0] = False
    idx2 = torch.cat([idx, idx[:, :1]], 1)
    logp2 = torch.cat([torch.full((n, 1), math.nan), logp[:, 1:], logp[:, :1]], 1)
    loss2, grad2 = loss_and_grad(reference.sparse_kd_loss, s, idx2, logp2, mask2, **kw)
    torch.testing.assert_close(loss2, expected, **F64)
    torch.testing.assert_close(grad2, expected_grad, **F64)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_oracle_all_masked_rows_and_k1(divergence, truncation):
    n, v, k = 5, 17, 3
    s = randn(n, v, seed=9)
    idx, logp, _ = top_k_teacher(n, v, k, seed=10)
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[1] = False
    mask[3, 1:] = False  # one entry left: under renormalize both sides are that one class
    kw = dict(temperature=1.5, divergence=divergence, truncation=truncation, reduction="none")
    loss, grad = loss_and_grad(reference.sparse_kd_loss, s, idx, logp, mask, **kw)
    assert loss[1] == 0 and (grad[1] == 0).all()
    assert loss[0] > 0 and loss[3] >= 0
    if truncation == "renormalize":
        assert loss[3] == 0 and (grad[3] == 0).all()
    else:  # the entry's class against the rest
        assert loss[3] > 0 and (grad[3] != 0).sum() == v
    assert torch.isfinite(grad).all()


def test_oracle_infinities_are_the_true_values():
    # A student that rules out a class the teacher lists: forward KL is +inf, with a finite
    # gradient; a class the teacher gives 0 (logprob -inf) contributes nothing.
    n, v, k = 3, 12, 4
    s = randn(n, v, seed=11)
    idx, logp, _ = top_k_teacher(n, v, k, seed=12)
    s[0, idx[0, 1]] = -math.inf
    logp[1, 2] = -math.inf
    s[1, idx[1, 2]] = -math.inf
    for truncation in TRUNCATIONS:
        loss, grad = loss_and_grad(reference.sparse_kd_loss, s, idx, logp, None, truncation=truncation,
                                   reduction="none")
        assert loss[0] == math.inf and torch.isfinite(loss[1:]).all()
        assert not torch.isnan(grad).any()


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_oracle_gradcheck(divergence, truncation):
    n, v, k = 3, 9, 4
    s = randn(n, v, seed=13).requires_grad_()
    idx, logp, _ = top_k_teacher(n, v, k, seed=14)
    idx[2, 3] = idx[2, 0]  # a duplicate
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[1, 2] = False
    labels = torch.tensor([4, -100, 7])
    torch.autograd.gradcheck(
        lambda x: reference.sparse_kd_loss(x, idx, logp, mask, 1.7, divergence=divergence, truncation=truncation,
                                           labels=labels, alpha=0.3, label_smoothing=0.1, reduction="none"),
        (s,))


# --- the op, on every kernel ------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def case(name, device, dtype, seed=20):
    """(student [n, v], indices, logprobs, mask or None, extra keywords) of a named shape."""
    n, v, k = 6, 37, 5
    kw = {}
    if name == "k1":
        k = 1
    if name == "k_eq_v":
        v = k = 11
    s = randn(n, v, seed=seed)
    idx, logp, _ = top_k_teacher(n, v, k, seed=seed + 1)
    mask = None
    if name == "duplicates_masked":
        idx[:, 3] = idx[:, 1]
        idx[0, 4] = -1  # masked: never read
        mask = torch.ones(n, k, dtype=torch.bool)
        mask[0, 4] = mask[2, 0] = False
        mask[4] = False  # a row with no entry
    if name == "neg_inf_student":
        s[1, 5] = s[2, 0] = -math.inf
        others = torch.ones(v, dtype=torch.bool)
        others[[5, 0]] = False
        idx[1:3] = torch.arange(v)[others][:k]  # the teacher lists none of the -inf classes
    if name == "labels_alpha":
        labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed + 2))
        labels[::3] = -100
        kw = dict(labels=labels.to(device), alpha=0.4, label_smoothing=0.1)
    return (s.to(dtype).to(device), idx.to(device), logp.to(dtype).to(device),
            None if mask is None else mask.to(device), kw)


CASES = ["top_k", "k1", "k_eq_v", "duplicates_masked", "neg_inf_student", "labels_alpha"]


def oracle(student, idx, logp, mask, grad_output=None, **kw):
    go = None if grad_output is None else grad_output.double()
    return loss_and_grad(reference.sparse_kd_loss, student.double(), idx, logp.double(), mask, grad_output=go, **kw)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_op_matches_the_oracle(divergence, truncation, name, dtype, device, backend):
    require(SPEC, device, backend)
    s, idx, logp, mask, extra = case(name, device, dtype)
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, truncation=truncation, reduction="none", **extra)
    # grad_output != 1; but not for bfloat16, whose saved gradient it would round a second time.
    go = randn(s.shape[0], seed=30, dtype=torch.float32).to(device) if dtype != torch.bfloat16 else None
    loss, grad = loss_and_grad(lambda *a, **k: sparse_kd_loss(*a, backend=backend, **k), s, idx, logp, mask,
                               grad_output=go, **kw)
    ref_loss, ref_grad = oracle(s, idx, logp, mask, grad_output=go, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == s.shape
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    else:
        _, low_grad = loss_and_grad(reference.sparse_kd_loss, s, idx, logp, mask, grad_output=go, **kw)
        ref_err = (low_grad.double() - ref_grad).abs().max().item()
        tol = low_precision_tolerance(dtype, ref_err, backend, ref_grad.abs().max().item())
        assert (grad.double() - ref_grad).abs().max().item() <= tol


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_cpu_streamed_gradient_rows(truncation, alpha):
    """A gradient past the CPU kernel's non-temporal store size (32 MiB), odd V: the entries'
    own gradients go out with the row's streamed stores, duplicates and masked entries too."""
    require(SPEC, "cpu", "cpu")
    n, v, k = 257, 32771, 64
    s = randn(n, v, seed=40, dtype=torch.float32)
    idx, logp, _ = top_k_teacher(n, v, k, seed=41)
    idx[:, 7] = idx[:, 3]
    idx[::5, -1] = v - 1  # the last column, in the ragged last vector
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(42)) > 0.1
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(43))
    labels[::4] = -100
    kw = dict(temperature=2.0, truncation=truncation, labels=labels, alpha=alpha, label_smoothing=0.1,
              reduction="none")
    loss, grad = loss_and_grad(lambda *a, **kw_: sparse_kd_loss(*a, backend="cpu", **kw_), s, idx,
                               logp.float(), mask, **kw)
    ref_loss, ref_grad = oracle(s, idx, logp, mask, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)


def near_tie_case(n, v, k, temperature, device):
    """(student [n, v], indices, logprobs) across the temperature range: logits of an LLM's
    size (conftest.temperature_sweep_logits) and a teacher's top-k log-probabilities that leave
    a tail (else the reverse KL of "tail" is infinite), each with its two largest entries T * 0.7
    apart and listed, so that both softmaxes have weights of order 1 beside the max at every T.
    Those are what x / T - max(x / T) gets wrong once x / T rounds: at T = 1e-4 a float32
    z ~ 1e6 is off by up to 0.06 in the exponent."""
    s = temperature_sweep_logits((n, v), temperature, seed=11)
    t = randn(n, v, seed=12)
    t[:, 0] = t.amax(-1) + 1.0
    t[:, 1] = t[:, 0] - 0.7 * temperature
    logp, idx = torch.log_softmax(t, -1).topk(k, -1)
    rows = torch.arange(n)
    s[rows, idx[:, 0]] = s.amax(-1) + 1.0
    s[rows, idx[:, 1]] = s[rows, idx[:, 0]] - 0.7 * temperature
    return s.to(device), idx.to(device), logp.to(s.dtype).to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_range(temperature, divergence, truncation, device, backend):
    """Every T of the documented range (1e-8 ... 1e4) agrees with the float64 oracle, soft and
    hard terms together, unscaled by T^2 (which would hide the soft term's error at a small T).
    A kernel that scales before it subtracts the max was off by 6% at T = 1e-4; one that took
    the student's tail mass as the row's sum minus the entries' gave +inf for forward KL under
    "tail" at T <= 1e-2 (the tail cancels below float32's epsilon)."""
    require(SPEC, device, backend)
    n, v, k = 5, 37, 6
    s, idx, logp = near_tie_case(n, v, k, temperature, device)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(13)).to(device)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, truncation=truncation, labels=labels,
              alpha=0.3, scale_by_t2=False, reduction="none")
    loss, grad = loss_and_grad(lambda *a, **k: sparse_kd_loss(*a, backend=backend, **k), s, idx, logp, None, **kw)
    ref_loss, ref_grad = oracle(s, idx, logp, None, **kw)
    eps = torch.finfo(s.dtype).eps
    # The teacher's tail 1 - L from log-probabilities in their dtype: a relative error of a few
    # eps / (1 - L), and at a small T the tail's KL term is most of the loss.
    tail = 1 - logp.double().exp().sum(-1).max().item()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5 + 4 * eps / tail)
    # Beside 1e-5 of the largest gradient and one ulp of the logits (as fused_kd_loss's sweep),
    # a few ulps of a probability times the soft gradient's weight (1 - alpha) / T.
    atol = 1e-5 * ref_grad.abs().max().item() + eps * s.abs().max().item() + 8 * eps * 0.7 / temperature
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=atol)


def listed_mass_case(masses, v, k, temperature, device):
    """(student [n, v] float32, indices, logprobs float32): row i's student puts masses[i] of
    its softmax(x / T) on its k listed classes (spread over several of a kernel's chunks), and
    the teacher lists half its mass there, so the tail bucket weighs on both sides."""
    n = len(masses)
    s = randn(n, v, seed=40, dtype=torch.float64, scale=1.0) * temperature
    idx = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(41 + i))[:k] for i in range(n)])
    listed = torch.zeros(n, v, dtype=torch.bool).scatter_(1, idx, True)
    # Shift the listed logits (their spread kept) so that their share of exp(x / T) is the mass.
    log_unlisted = torch.logsumexp((s / temperature).masked_fill(listed, -math.inf), -1)
    log_listed = torch.logsumexp((s / temperature).masked_fill(~listed, -math.inf), -1)
    m = torch.tensor(masses, dtype=torch.float64)
    shift = (torch.log(m) - torch.log1p(-m) + log_unlisted - log_listed) * temperature
    s = torch.where(listed, s + shift[:, None], s)
    logp = torch.log_softmax(randn(n, k, seed=42, scale=1.0), -1) + math.log(0.5)
    return s.float().to(device), idx.to(device), logp.float().to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 1e-2])
def test_tail_from_a_flat_to_a_peaked_student(temperature, divergence, device, backend):
    """The student's listed mass from 1e-4 to 1 - 1e-7 (a student peaked on the teacher's top-k,
    the common case once it trains): its tail is exact at every one. Taken as the row's sum
    minus the entries' in float32, a tail of 1e-7 of the row's mass cancels (eps = 1.2e-7), off
    by its own size, and the tail bucket's terms with it."""
    require(SPEC, device, backend)
    masses = [1e-4, 0.3, 0.6, 1 - 1e-4, 1 - 1e-7]
    s, idx, logp = listed_mass_case(masses, v=600, k=7, temperature=temperature, device=device)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, truncation="tail", scale_by_t2=False,
              reduction="none")
    loss, grad = loss_and_grad(lambda *a, **k: sparse_kd_loss(*a, backend=backend, **k), s, idx, logp, None, **kw)
    ref_loss, ref_grad = oracle(s, idx, logp, None, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    # 1e-5 of the largest gradient (as the sweep above); a listed entry's gradient is 1 / T.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_reductions_and_num_items(reduction, device, backend):
    require(SPEC, device, backend)
    s, idx, logp, mask, extra = case("labels_alpha", device, torch.float32)
    for num_items in (None, 7):
        kw = dict(truncation="tail", reduction=reduction, num_items_in_batch=num_items, **extra)
        loss, grad = loss_and_grad(lambda *a, **k: sparse_kd_loss(*a, backend=backend, **k), s, idx, logp, mask,
                                   **kw)
        ref_loss, ref_grad = oracle(s, idx, logp, mask, **kw)
        torch.testing.assert_close(loss.double(), ref_loss, **TOL)
        torch.testing.assert_close(grad.double(), ref_grad, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_op_leading_dims_and_no_grad(device, backend):
    require(SPEC, device, backend)
    s, idx, logp, mask, _ = case("duplicates_masked", device, torch.float32)
    s3, idx3, logp3, mask3 = (x.reshape(2, 3, -1) for x in (s, idx, logp, mask))
    loss = sparse_kd_loss(s3.transpose(0, 1).contiguous().transpose(0, 1), idx3, logp3, mask3.int(),
                          reduction="none", backend=backend)
    assert loss.shape == (2, 3)
    with torch.no_grad():
        flat = sparse_kd_loss(s, idx, logp, mask, reduction="none", backend=backend)
    torch.testing.assert_close(loss.reshape(-1), flat, **TOL)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
def test_op_checks_the_indices_it_reads(device, backend):
    require(SPEC, device, backend)
    s, idx, logp, _, _ = case("top_k", device, torch.float32)
    bad = idx.clone()
    bad[2, 1] = s.shape[-1]
    with pytest.raises(ValueError, match="teacher_indices"):
        sparse_kd_loss(s, bad, logp, backend=backend)
    mask = torch.ones_like(bad, dtype=torch.bool)
    mask[2, 1] = False  # not read: no error
    sparse_kd_loss(s, bad, logp, mask, backend=backend)
    labels = torch.zeros(s.shape[0], dtype=torch.long, device=device)
    labels[2] = -100  # an ignored row is not read either
    sparse_kd_loss(s, bad, logp, labels=labels, backend=backend)
    nan = logp.clone()
    nan[3, 0] = math.nan
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sparse_kd_loss(s, idx, nan, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_index_errors_are_device_assertions(backend):
    """An out-of-range index that is read ends a GPU process; masked entries and ignored rows
    are not read, so the same index there passes."""
    require(SPEC, "cuda", backend)
    assert_device_assertion("""
        s = torch.randn(6, 37, device="cuda")
        logp, idx = torch.log_softmax(torch.randn(6, 37, device="cuda"), -1).topk(5, -1)
        idx[2, 1] = 37
        mask = torch.ones_like(idx, dtype=torch.bool)
        mask[2, 1] = False
        labels = torch.zeros(6, dtype=torch.long, device="cuda")
        labels[2] = -100
    """, f'lepton_fast.sparse_kd_loss(s, idx, logp, mask, backend="{backend}"); '
         f'lepton_fast.sparse_kd_loss(s, idx, logp, labels=labels, backend="{backend}")',
        f'lepton_fast.sparse_kd_loss(s, idx, logp, backend="{backend}")')


def test_argument_errors():
    s, idx, logp, mask, _ = case("top_k", "cpu", torch.float32)
    with pytest.raises(ValueError, match="teacher_indices must have shape"):
        sparse_kd_loss(s, idx[:-1], logp)
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        sparse_kd_loss(s, idx, logp[:, :-1])
    with pytest.raises(TypeError, match="teacher_indices must be an integer"):
        sparse_kd_loss(s, idx.float(), logp)
    with pytest.raises(TypeError, match="teacher_logprobs must be float32"):
        sparse_kd_loss(s, idx, idx)
    with pytest.raises(TypeError, match="teacher_mask"):
        sparse_kd_loss(s, idx, logp, torch.ones_like(logp))
    with pytest.raises(ValueError, match="at least one entry"):
        sparse_kd_loss(s, idx[:, :0], logp[:, :0])
    with pytest.raises(ValueError, match="truncation"):
        sparse_kd_loss(s, idx, logp, truncation="other_bucket")
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd_loss(s, idx, logp, temperature=0.0)
    with pytest.raises(ValueError, match="labels are required"):
        sparse_kd_loss(s, idx, logp, alpha=0.5)


@pytest.mark.cuda
def test_cuda_kernel_class_limit():
    """The CUDA C++ kernel marks the listed columns in a shared-memory bitmap of V bits: right at
    its limit of 327680 classes it agrees with the oracle (the bitmap's last word in use), one
    class more is an error that names the limit and the backend that takes any V."""
    require(SPEC, "cuda", "cuda")
    limit = 40 * 1024 * 8
    idx, logp, _ = top_k_teacher(2, limit, 8, seed=60)
    idx[:, 0] = limit - 1
    s = randn(2, limit, seed=61, dtype=torch.float32)
    kw = dict(temperature=2.0, truncation="tail", reduction="none")
    loss, grad = loss_and_grad(lambda *a, **k: sparse_kd_loss(*a, backend="cuda", **k), s.cuda(), idx.cuda(),
                               logp.float().cuda(), None, **kw)
    ref_loss, ref_grad = oracle(s, idx, logp, None, **kw)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, **TOL)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, **TOL)
    wide = torch.zeros(2, limit + 1, device="cuda")
    with pytest.raises(RuntimeError, match=f"at most {limit} classes"):
        sparse_kd_loss(wide, idx.cuda(), logp.float().cuda(), backend="cuda")


def test_second_order_gradient_is_refused():
    s, idx, logp, _, _ = case("top_k", "cpu", torch.float64)
    s.requires_grad_()
    loss = sparse_kd_loss(s, idx, logp)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(SPEC, device, backend)
    s, idx, logp, mask, extra = case("duplicates_masked", device, torch.float32)
    labels = torch.tensor([1, -100, 3, 4, 0, 2], device=device)
    arg_sets = [
        (s.requires_grad_(), idx, logp, mask, None, kd_hyper(temperature=2.0), "tail", -100, "mean", None, True),
        (s.detach(), idx, logp.double(), mask, labels,
         kd_hyper(divergence="jsd", beta=0.3, alpha=0.5, label_smoothing=0.1, scale_by_t2=False), "renormalize", -100,
         "none", None, False),
    ]
    opcheck_kernel(SPEC, device, backend, arg_sets)


def test_torch_compile_fullgraph():
    s, idx, logp, mask, _ = case("duplicates_masked", "cpu", torch.float32)
    compiled = torch.compile(sparse_kd_loss, fullgraph=True, backend="aot_eager")
    for temperature in (2.0, 3.0):  # a new temperature does not recompile (a 0-d tensor)
        loss, grad = loss_and_grad(lambda *a, **k: compiled(*a, **k), s, idx, logp, mask, temperature,
                                   truncation="tail")
        ref_loss, ref_grad = oracle(s, idx, logp, mask, temperature=temperature, truncation="tail")
        torch.testing.assert_close(loss.double(), ref_loss, **TOL)
        torch.testing.assert_close(grad.double(), ref_grad, **TOL)


@TRITON_COLUMN_BLOCKS
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_triton_column_blocks(truncation, n, c, block):
    # The row passes at the edges of their column blocks: the kernel called with a small block.
    require(SPEC, "cpu", "triton")
    from lepton_fast.kernels.sparse_kd_loss import sparse_kd_loss as kernel

    k = min(3, c)
    s = randn(n, c, seed=50, dtype=torch.float32)
    idx, logp, _ = top_k_teacher(n, c, k, seed=51)
    logp = logp.float()
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(52))
    hyper = kd_hyper(temperature=2.0, divergence="jsd", alpha=0.3, label_smoothing=0.1)
    loss, grad = kernel(s, idx, logp, None, labels, hyper, truncation, -100, "none", None, True, block=block)
    kw = dict(temperature=2.0, divergence="jsd", truncation=truncation, labels=labels, alpha=0.3,
              label_smoothing=0.1, reduction="none")
    ref_loss, ref_grad = oracle(s, idx, logp, None, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)


# --- drop-in for axolotl's top-k forward KL -----------------------------------------------------


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
@pytest.mark.parametrize("normalize_topk", [True, False])
def test_axolotl_top_k_forward_kl_drop_in(normalize_topk, kd_temperature, device, backend):
    # axolotl's collator renormalises the stored top-k over its K entries, so the stored
    # log-probabilities sum to 1: normalize_topk=True is "renormalize", False is "tail"
    # (whose teacher tail is then 0). axolotl masks whole positions (labels -100).
    require(SPEC, device, backend)
    b, t, v, k = 2, 5, 50, 8
    student = randn(b, t, v, seed=40).to(device)
    idx, raw, _ = top_k_teacher(b * t, v, k, seed=41)
    idx, raw = idx.reshape(b, t, k).to(device), raw.reshape(b, t, k).to(device)
    mask = torch.ones(b, t, k, dtype=torch.long, device=device)
    mask[0, 0] = mask[1, 3] = 0
    stored = raw - raw.logsumexp(-1, keepdim=True)  # at T = 1, renormalised: what the collator starts from
    target_logprobs = axolotl_collated_logprobs(raw, kd_temperature)
    truncation = "renormalize" if normalize_topk else "tail"
    for num_items in (3, int(mask.sum())):  # axolotl's default divides by the unmasked entries
        expected, expected_grad = loss_and_grad(axolotl_topk_forward_kl, student, idx, target_logprobs, mask,
                                                num_items, kd_temperature, normalize_topk)
        loss, grad = loss_and_grad(lambda *a, **kw: sparse_kd_loss(*a, backend=backend, **kw), student, idx,
                                   stored, mask, kd_temperature, truncation=truncation, reduction="sum",
                                   num_items_in_batch=num_items)
        torch.testing.assert_close(loss.double(), expected, **F64)
        torch.testing.assert_close(grad.double(), expected_grad, **F64)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
def test_tail_where_the_listed_mass_is_one_float32_step_below_1(device, backend):
    """A confident teacher's top-1 log-probability in float32 is about -1.2e-7 (a new user's
    hunt, 'break8'): 1 - L is then 1e-7, below float32's step at 1, and T = 1e-4 scales it up.
    The tail bucket is log(1 - L) from log L without rounding L (Triton took 1 - exp(log L):
    6.0e-8, its loss 40 % low). The gradient at the entry, Q - p with both within 1e-7 of 1, is float32's
    q - p as torch's own autograd gives it (the reference, plain PyTorch, too): exact to
    float32's step at 1, over T."""
    require(SPEC, device, backend)
    x, idx, lp = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[2]]), torch.tensor([[-1e-7]])
    kw = dict(temperature=1e-4, truncation="tail", scale_by_t2=False)
    x64 = x.double().requires_grad_()
    want = reference.sparse_kd_loss(x64, idx, lp.double(), **kw)
    want.backward()
    x32 = x.clone().requires_grad_()
    got = sparse_kd_loss(x32, idx, lp, backend=backend, **kw)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=0)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=eps / kw["temperature"])


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_data_error_reads_the_same_on_every_cpu_kernel(reduction, device, backend):
    """A teacher index or label out of range and a row with no softmax: every kernel names the
    op, the argument, the value and where it is in the same words, whatever the reduction."""
    require(SPEC, device, backend)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 12, 7], [8, 9, 0]])
    lp = torch.log_softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(6)), -1)
    with pytest.raises(ValueError, match=re.escape(
            "sparse_kd_loss: teacher_indices must be in [0, 10) where teacher_mask is True; got 12 at row 2, entry 1")
            + "$"):
        sparse_kd_loss(x, idx, lp, reduction=reduction, backend=backend)
    idx[2, 1] = 1
    with pytest.raises(ValueError, match=re.escape(
            "sparse_kd_loss: labels must be in [0, 10) or equal ignore_index=-100; got -3 at row 3") + "$"):
        sparse_kd_loss(x, idx, lp, labels=torch.tensor([1, 2, 3, -3]), alpha=0.5, reduction=reduction,
                       backend=backend)
    for fill, truncation in (("-inf", "tail"), ("nan", "tail"), ("nan", "renormalize")):
        bad = x.clone()
        if fill == "-inf":
            bad[3] = -math.inf
        else:
            bad[3, 8] = math.nan  # a listed column under "renormalize"
        with pytest.raises(ValueError, match=re.escape(
                "sparse_kd_loss: row 3 of student_logits or teacher_logprobs is entirely -inf, or holds +inf or NaN, "
                "so its softmax is undefined") + "$"):
            sparse_kd_loss(bad, idx, lp, temperature=1e-3, truncation=truncation, reduction=reduction,
                           backend=backend)
    # the teacher's side: a NaN beside -inf entries under "tail" (the reference and Triton took
    # the row as one with no listed mass, 'break10'), a NaN among finite ones, a +inf
    for row, truncation in (([math.nan, -math.inf, -math.inf], "tail"), ([math.nan] * 3, "tail"),
                            ([-0.5, math.nan, -1.0], "tail"), ([math.nan, -math.inf, -math.inf], "renormalize"),
                            ([math.inf, -1.0, -2.0], "renormalize")):
        bad = lp.clone()
        bad[3] = torch.tensor(row)
        with pytest.raises(ValueError, match=re.escape(
                "sparse_kd_loss: row 3 of student_logits or teacher_logprobs is entirely -inf, or holds +inf or NaN, "
                "so its softmax is undefined") + "$"):
            sparse_kd_loss(x, idx, bad, truncation=truncation, reduction=reduction, backend=backend)

