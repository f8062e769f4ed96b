"""Triton kernel of sparse_kd_loss (schema: lepton_fast/ops/sparse_kd_loss.py), the contract of
the reference kernel; the buckets are lepton_fast.reference.sparse_buckets'.

One program per row. The maxima are of the raw logits and log-probabilities, every exponent
(x - max) / T (csrc/common.h, log_sum: exact at the max for every T in 1e-8 ... 1e4). The
teacher's K entries sit in one block of KB = next_power_of_2(K) lanes (made for the usual K
of 1 to a few hundred; a K of many thousands spills registers), which count (mask, first
occurrence of an index: a loop over the K entries), the teacher's bucket log-probabilities,
the student's logits gathered at the entries. One pass over the student row gathers the online
softmax statistics that "tail" needs (at T, of the unlisted columns) and the CE needs (at
T = 1); "renormalize" without the CE reads only the K entries. The gradient pass writes the
whole row (the unlisted columns' formula, or zeros), then, after a barrier, the entries'
columns.

With g_b = dD/d(log Q_b) of each student bucket and G = sum_b g_b, the gradient of the soft term
is (g_k - Q_k G) / T at an entry's column and, under "tail", (pu_j g_tail - p_j G) / T at an
unlisted column j (p = softmax(z) over the row, pu over the unlisted columns: csrc/sparse_kd_loss.h
has the derivation's notation). The student's tail is the log-sum-exp of the unlisted columns,
summed over them in the same pass (each column block masks the entries' columns it holds), and
the row's statistics are those merged with the entries': never the row's sum minus the
entries', which at T <= 1e-2 cancels below float32's epsilon and left an infinite forward KL.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from lepton_fast._validate import kd_values

from ._common import acc_dtype, check_labels, check_rows_defined, no_bad_values, online_softmax, reduce_rows, \
    signature, store_zeros
from .kd_loss import (BLOCKS, _in_acc, _kl_term, _label_of_row, _log_mixture, _log_sum, column_block, mixture_logs,
                      num_warps, soft_weights, switch_variants, switches)


@triton.jit
def _lse_vec(x):
    """log-sum-exp of a block; -inf when no entry is above -inf."""
    m = tl.max(x, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(m == float("-inf"), m, safe + tl.log(tl.sum(tl.exp(x - safe), 0)))


@triton.jit
def _log_softmax_vec(x, scale):
    """log softmax(x * scale) of a block, scale = 1 / T > 0, as (x - max) * scale - log sum
    exp((x - max) * scale): the max subtracted before the scaling; NaN when no entry is above
    -inf (the caller keeps the entries that count)."""
    y = (x - tl.max(x, 0)) * scale
    return y - tl.log(tl.sum(tl.exp(y), 0))


@triton.jit
def _bucket(logp, logq, beta, log_beta, log_1m_beta, DIV: tl.constexpr):
    """(divergence term, g = dD/d(log Q)) of buckets with teacher and student log-probabilities
    logp, logq, elementwise (csrc/sparse_kd_loss.h, sparse_bucket)."""
    q = tl.exp(logq)
    if DIV == 0:
        d = _kl_term(logp, logq)
        g = -tl.exp(logp)
    elif DIV == 1:
        d = _kl_term(logq, logp)
        g = tl.where(q == 0.0, 0.0, q * (logq - logp))
    else:
        lm = _log_mixture(logq, logp, log_beta, log_1m_beta)
        d = beta * _kl_term(logp, lm) + (1.0 - beta) * _kl_term(logq, lm)
        g = tl.where(q == 0.0, 0.0, (1.0 - beta) * q * (logq - lm))
    return d, g


@triton.jit
def _listed_in_block(idx, counted, cols, off, BLOCK: tl.constexpr):
    """Which of the columns cols = off + [0, BLOCK) are counted entries' indices: a walk over
    the block's entries in increasing order (counted indices are distinct), so a row costs its
    K entries' compares in all, not K per block."""
    in_blk = counted & (idx >= off) & (idx < off + BLOCK)
    hit = cols < 0
    prev = tl.full([], off - 1, tl.int64)
    for _ in range(0, tl.sum(in_blk.to(tl.int32), 0)):
        j = tl.min(tl.where(in_blk & (idx > prev), idx, off + BLOCK), 0)
        hit = hit | (cols == j)
        prev = j
    return hit


@triton.jit
def _sparse_kd_loss_kernel(
    s_ptr, idx_ptr, lp_ptr, mask_ptr, y_ptr, g_ptr, loss_ptr, gs_ptr,
    V, K, s_stride, idx_stride, lp_stride, mask_stride,
    inv_t: tl.float64, beta: tl.float64, log_beta: tl.float64, log_1m_beta: tl.float64, alpha: tl.float64,
    label_smoothing: tl.float64, soft_w: tl.float64, soft_gw: tl.float64, ignore_index,
    DIV: tl.constexpr, TAIL: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
    KB: tl.constexpr, BLOCK: tl.constexpr,
):
    neg_inf = float("-inf")
    inv_t, beta, log_beta, log_1m_beta, alpha, label_smoothing, soft_w, soft_gw = _in_acc(
        inv_t, beta, log_beta, log_1m_beta, alpha, label_smoothing, soft_w, soft_gw, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    g_row = g_ptr + row * V
    cols0 = tl.arange(0, BLOCK)
    ignored, label = _label_of_row(y_ptr, row, V, 0, ignore_index, HAS_LABELS)
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, V, BLOCK)
    else:
        ks = tl.arange(0, KB)
        in_k = ks < K
        idx = tl.load(idx_ptr + row * idx_stride + ks, mask=in_k, other=0)
        read = in_k
        if HAS_MASK:
            read = read & (tl.load(mask_ptr + row * mask_stride + ks, mask=in_k, other=0) != 0)
        dup = ks < 0
        for j in range(0, K):  # an index counts at its first read occurrence
            later = (idx == tl.load(idx_ptr + row * idx_stride + j)) & (ks > j)
            if HAS_MASK:
                later = later & (tl.load(mask_ptr + row * mask_stride + j) != 0)
            dup = dup | later
        counted = read & ~dup
        covers = tl.sum(counted.to(tl.int32), 0) == V
        # The pass over the row: softmax statistics at T of the columns not listed (tail) and at
        # T = 1 of all of them (the CE).
        m_u = tl.full([], neg_inf, ACC)
        l_u = tl.zeros([], ACC)
        m1 = tl.full([], neg_inf, ACC)
        l1 = tl.zeros([], ACC)
        sum_x = tl.zeros([], ACC)
        if (TAIL and NEEDS_SOFT) or NEEDS_CE:
            for off in range(0, V, BLOCK):
                cols = off + cols0
                x = tl.load(s_row + cols, mask=cols < V, other=neg_inf).to(ACC)
                if TAIL and NEEDS_SOFT:
                    listed = _listed_in_block(idx, counted, cols, off, BLOCK)
                    m_u, l_u, _e, _f = online_softmax(m_u, l_u, tl.where(listed, neg_inf, x), inv_t)
                if NEEDS_CE:
                    m1, l1, _e1, _f1 = online_softmax(m1, l1, x, 1.0)
                if SMOOTH:
                    sum_x += tl.sum(tl.where(cols < V, x, 0.0), 0)
        row_loss = tl.zeros([], ACC)
        xk = tl.load(s_row + idx, mask=counted, other=neg_inf).to(ACC)
        g = tl.zeros([KB], ACC)
        lq = tl.full([KB], neg_inf, ACC)
        big_g = tl.zeros([], ACC)
        g_tail = tl.zeros([], ACC)
        # The row's softmax at T: the unlisted columns' statistics merged with the entries'.
        m = tl.maximum(m_u, tl.max(xk, 0))
        safe_m = tl.where(m == neg_inf, 0.0, m)
        l = l_u * tl.exp((m_u - safe_m) * inv_t) + tl.sum(tl.where(counted, tl.exp((xk - safe_m) * inv_t), 0.0), 0)
        log_l_all = _log_sum(l)  # log softmax(x / T)_j = (x_j - m) / T - log_l_all
        log_l_u = tl.log(l_u)  # log softmax(x / T)_j over the unlisted j = (x_j - m_u) / T - log_l_u
        if NEEDS_SOFT:
            lp = tl.load(lp_ptr + row * lp_stride + ks, mask=counted, other=neg_inf).to(ACC)
            logp_t = _log_softmax_vec(lp, inv_t)
            if TAIL:
                log_l = tl.where(covers, 0.0, tl.minimum(_lse_vec(lp), 0.0))
                logp = tl.where(counted, tl.where(log_l == neg_inf, neg_inf, logp_t + log_l), neg_inf)
                lp_tail = tl.log(1.0 - tl.exp(log_l))
                lq = tl.where(counted, (xk - m) * inv_t - log_l_all, neg_inf)
                # (l_u = 0: no unlisted column; -inf, or NaN with an undefined row)
                lq_tail = tl.where(l_u > 0, (m_u - safe_m) * inv_t + log_l_u, neg_inf) - log_l_all
                d_tail, g_tail = _bucket(lp_tail, lq_tail, beta, log_beta, log_1m_beta, DIV)
            else:
                logp = tl.where(counted, logp_t, neg_inf)
                lq = tl.where(counted, _log_softmax_vec(xk, inv_t), neg_inf)
                d_tail = tl.zeros([], ACC)
            d, g = _bucket(logp, lq, beta, log_beta, log_1m_beta, DIV)
            big_g = tl.sum(tl.where(counted, g, 0.0), 0) + g_tail
            row_loss += soft_w * (tl.sum(tl.where(counted, d, 0.0), 0) + d_tail)
        lse1 = m1 + _log_sum(l1)
        if NEEDS_CE:
            x_label = tl.load(s_row + tl.maximum(label, 0)).to(ACC)
            row_loss += alpha * (lse1 - (1.0 - label_smoothing) * x_label - label_smoothing / V * sum_x)
        tl.store(loss_ptr + row, row_loss)
        if COMPUTE_GRAD:
            gs = tl.load(gs_ptr).to(ACC)
            sg = soft_gw * gs
            cg = alpha * gs
            if (TAIL and NEEDS_SOFT) or NEEDS_CE:
                for off in range(0, V, BLOCK):
                    cols = off + cols0
                    x = tl.load(s_row + cols, mask=cols < V, other=neg_inf).to(ACC)
                    dv = tl.zeros([BLOCK], ACC)
                    if TAIL and NEEDS_SOFT:
                        p = tl.exp((x - m) * inv_t - log_l_all)
                        # At most 1 at an unlisted column; the cap keeps the listed ones (rewritten
                        # below) finite.
                        pu = tl.exp(tl.minimum((x - m_u) * inv_t - log_l_u, 0.0))
                        dv = (tl.where(pu == 0.0, 0.0, pu * g_tail) - tl.where(p == 0.0, 0.0, p * big_g)) * sg
                    if NEEDS_CE:
                        dv += cg * (tl.exp(x - lse1) - label_smoothing / V
                                    - tl.where(cols == label, 1.0 - label_smoothing, 0.0))
                    tl.store(g_row + cols, dv.to(g_row.dtype.element_ty), mask=cols < V)
            else:
                store_zeros(g_row, V, BLOCK)
            if NEEDS_SOFT:
                tl.debug_barrier()  # the entries' columns over the row's values, from every thread
                dk = (g - tl.exp(lq) * big_g) * sg
                if NEEDS_CE:
                    xk = tl.load(s_row + idx, mask=counted, other=0.0).to(ACC)
                    dk += cg * (tl.exp(xk - lse1) - label_smoothing / V
                                - tl.where(idx == label, 1.0 - label_smoothing, 0.0))
                tl.store(g_row + idx, dk.to(g_row.dtype.element_ty), mask=counted)


def sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, teacher_mask, labels, hyper, truncation,
                   ignore_index, reduction, num_items_in_batch, compute_grad, *, block=None):
    """(loss as ``reduction`` asks, d(loss)/d(student) or an empty tensor): the contract of
    ``torch.ops.lepton_fast.sparse_kd_loss``. ``block`` overrides the column block, for tests."""
    op = "sparse_kd_loss"
    rows_of = (student_logits, teacher_indices, teacher_logprobs) + (() if teacher_mask is None else (teacher_mask,))
    if any(x.dim() != 2 or x.stride(1) != 1 for x in rows_of):
        raise ValueError(f"{op}: student_logits and the teacher's tensors must be 2-d with rows contiguous")
    n, v = student_logits.shape
    k = teacher_indices.shape[1]
    if teacher_indices.shape[0] != n or teacher_logprobs.shape != teacher_indices.shape or (
            teacher_mask is not None and teacher_mask.shape != teacher_indices.shape):
        raise ValueError(f"{op}: the teacher's tensors must be [{n}, K] alike")
    h = kd_values(hyper)
    inv_t, soft_weight, soft_grad_weight = soft_weights(h)
    chosen = switches(h, labels is not None)
    del chosen["CE_OWN"]  # the CE's statistics are always its own here
    acc, tl_acc = acc_dtype(student_logits)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
        check_labels(op, labels, v, ignore_index)
    read = torch.ones_like(teacher_indices, dtype=torch.bool) if teacher_mask is None else teacher_mask.bool()
    if labels is not None:
        read = read & (labels != ignore_index)[:, None]
    no_bad_values(read & ((teacher_indices < 0) | (teacher_indices >= v)),
                  f"{op}: teacher_indices must be in [0, {v}) where teacher_mask is True")
    rows = torch.empty(n, dtype=acc, device=student_logits.device)
    grad = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty((0,))
    divisor = max(n, 1) if labels is None else (labels != ignore_index).sum().clamp(min=1)
    if num_items_in_batch is not None:
        divisor, reduction = num_items_in_batch, "mean"  # the sum over this count instead
    divides = reduction in ("mean", "batchmean")
    grad_scale = 1.0 / torch.as_tensor(divisor if divides else 1, dtype=torch.float64, device=student_logits.device)
    mask = rows if teacher_mask is None else teacher_mask.view(torch.uint8)  # (an absent mask: any pointer)
    if n:
        blk = column_block(v, block)
        _sparse_kd_loss_kernel[(n,)](
            student_logits, teacher_indices, teacher_logprobs, mask,
            rows if labels is None else labels, grad, rows, grad_scale,
            v, k, student_logits.stride(0), teacher_indices.stride(0), teacher_logprobs.stride(0),
            0 if teacher_mask is None else teacher_mask.stride(0),
            inv_t, h["beta"], *mixture_logs(h["beta"]), h["alpha"], h["label_smoothing"], soft_weight,
            soft_grad_weight, ignore_index,
            TAIL=truncation == "tail", HAS_MASK=teacher_mask is not None, COMPUTE_GRAD=compute_grad, ACC=tl_acc,
            KB=entry_block(k), BLOCK=blk, num_warps=num_warps(blk), **chosen,
        )
    check_rows_defined(op, rows, "student_logits or teacher_logprobs")
    return reduce_rows(rows, reduction, divisor), grad


def entry_block(k: int) -> int:
    """The block of lanes the teacher's K entries sit in: 16 upwards."""
    return max(triton.next_power_of_2(k), 16)


def compile_targets():
    """Every variant the launcher above can pick, for tests/test_triton_aot.py:
    [(kernel, signature, constexprs, options)], derived from its definitions: per student
    dtype and the log-probabilities' dtype (the student's, or float32), the kernel's
    switch_variants() (kernels/kd_loss.py), truncation, mask given, gradient wanted, the
    entries' block KB (two sizes listed) and the column block (BLOCKS, with its num_warps).
    An absent mask or labels gets the row-loss buffer in its place."""
    targets = []
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for lp_dtype, chosen, tail, has_mask, compute_grad, kb, block in itertools.product(
                sorted({dtype, "fp32"}), switch_variants(_sparse_kd_loss_kernel), (False, True), (False, True),
                (False, True), (entry_block(1), entry_block(100)), BLOCKS):
            pointers = {"s_ptr": f"*{dtype}", "idx_ptr": "*i64", "lp_ptr": f"*{lp_dtype}", "g_ptr": f"*{dtype}",
                        "mask_ptr": "*u8" if has_mask else f"*{acc}", "gs_ptr": "*fp64",
                        "y_ptr": "*i64" if chosen["HAS_LABELS"] else f"*{acc}"}
            constexprs = {**chosen, "TAIL": tail, "HAS_MASK": has_mask, "COMPUTE_GRAD": compute_grad,
                          "ACC": tl.float64 if acc == "fp64" else tl.float32, "KB": kb, "BLOCK": block}
            targets.append((_sparse_kd_loss_kernel, signature(_sparse_kd_loss_kernel, pointers, f"*{acc}"), constexprs,
                            {"num_warps": num_warps(block)}))
    return targets
