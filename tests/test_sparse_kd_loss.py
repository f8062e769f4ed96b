"""sparse_kd_loss: the oracle (lepton_fast.reference) against independent dense computations,
and every kernel against the oracle in float64.

The dense checks: with every class listed once the teacher's entries are its whole
distribution, so both truncations are fused_kd_loss on the full teacher; with K < V the
buckets of each truncation are written out as logits of a [N, K] or [N, K + 1] fused_kd_loss
(the student's tail by boolean indexing, not the oracle's scatter).
"""
import math

import pytest
import torch

from lepton_fast import reference

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

