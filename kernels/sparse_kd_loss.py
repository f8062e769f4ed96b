"""Triton kernels of sparse_kd_loss and of its vocabulary-parallel split sparse_slice_stats /
sparse_slice_grad (schemas: lepton_fast/ops/sparse_kd_loss.py), the contract of the reference
kernels; the buckets are lepton_fast.reference.sparse_buckets'.

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

The slice ops split a row there, as the CPU kernels do (csrc/cpu/sparse_kd_loss_rows.h), one
program per row of a rank's slice: sparse_slice_stats is the pass (_row_pass, the entries'
columns given as ``column``, -1 where an entry is not in the slice or does not count), and
sparse_slice_grad one pass that writes the formula of the unlisted columns at every column
from the rows' merged coefficients, then, after a barrier, the listed columns'.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from lepton_fast._validate import (choice, kd_values, labels_in_range, rows_defined, slice_columns, slice_of_rows,
                                   teacher_indices_in_range)
from lepton_fast.ops import sparse_kd_loss as ops

from ._common import acc_dtype, online_softmax, reduce_rows, signature, store_zeros
from .kd_loss import (BLOCKS, _in_acc, _kl_term, _label_of_row, _log_mixture, _log_sum, column_block,
                      kernel_switches, mixture_logs, num_warps, soft_weights, switch_variants)


@triton.jit
def _lse_vec(x):
    """log-sum-exp of a block; -inf when every entry is -inf; NaN when one is NaN (tl.max
    passes over a NaN, and a teacher row of NaN and -inf would pass as empty)."""
    m = tl.max(x, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(m == float("-inf"), m, safe + tl.log(tl.sum(tl.exp(x - safe), 0)))
    return tl.where(tl.max((x != x).to(tl.int32), 0) > 0, float("nan"), lse)


@triton.jit
def _log_one_minus_exp(a):
    """log(1 - exp(a)) for a <= 0, the C++ kernels' log(-expm1(a)): a listed mass L = exp(a)
    within float32 steps of 1 leaves 1 - L exact (1 - exp(-1e-7) would round to 1.19e-7).
    Triton's interpreter has no expm1, so near 0 it is the series -a (1 + a/2 + a^2/6 + ...),
    7 terms: below 3e-12 of the value for a > -0.1, where 1 - exp(a) loses more than 1e-6."""
    poly = 1.0 + a / 7.0
    for k in tl.static_range(2, 7):  # Horner: 1 + a/6 (...), down to 1 + a/2 (...)
        poly = 1.0 + a / (8 - k) * poly
    return tl.log(tl.where(a > -0.1, -a * poly, 1.0 - tl.exp(a)))


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
def _row_pass(s_row, V, idx, counted, inv_t, UNLISTED: tl.constexpr, NEEDS_CE: tl.constexpr, SMOOTH: tl.constexpr,
              ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The pass over the V columns at s_row (a row, or a slice of one), the counted entries'
    columns ``idx`` where ``counted``: (m_u, l_u), the online softmax statistics at T of the
    columns no counted entry lists (UNLISTED, "tail"); (m1, l1), those at T = 1 of every
    column (NEEDS_CE); sum_x, the sum of the logits (SMOOTH). -inf, 0 where not asked for."""
    neg_inf = float("-inf")
    cols0 = tl.arange(0, BLOCK)
    m_u = tl.full([], neg_inf, ACC)
    l_u = tl.zeros([], ACC)
    m1 = tl.full([], neg_inf, ACC)
    l1 = tl.zeros([], ACC)
    sum_x = tl.zeros([], ACC)
    if UNLISTED or NEEDS_CE:
        for off in range(0, V, BLOCK):
            cols = off + cols0
            x = tl.load(s_row + cols, mask=cols < V, other=neg_inf).to(ACC)
            if UNLISTED:
                listed = _listed_in_block(idx, counted, cols, off, BLOCK)
                m_u, l_u, _e, _f = online_softmax(m_u, l_u, tl.where(listed, neg_inf, x), inv_t)
            if NEEDS_CE:
                m1, l1, _e1, _f1 = online_softmax(m1, l1, x, 1.0)
            if SMOOTH:
                sum_x += tl.sum(tl.where(cols < V, x, 0.0), 0)
    return m_u, l_u, m1, l1, sum_x


@triton.jit
def _with_entries(m_u, l_u, xk, inv_t):
    """The softmax statistics at T (max, sum) of the unlisted columns (m_u, l_u) merged with the
    entries' logits xk (-inf where an entry does not count)."""
    m = tl.maximum(m_u, tl.max(xk, 0))
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    return m, l_u * tl.exp((m_u - safe_m) * inv_t) + tl.sum(tl.exp((xk - safe_m) * inv_t), 0)


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
        m_u, l_u, m1, l1, sum_x = _row_pass(s_row, V, idx, counted, inv_t, TAIL and NEEDS_SOFT, NEEDS_CE, SMOOTH,
                                            ACC, BLOCK)
        row_loss = tl.zeros([], ACC)
        xk = tl.load(s_row + idx, mask=counted, other=neg_inf).to(ACC)
        g = tl.zeros([KB], ACC)
        lq = tl.full([KB], neg_inf, ACC)
        big_g = tl.zeros([], ACC)
        g_tail = tl.zeros([], ACC)
        m, l = _with_entries(m_u, l_u, xk, inv_t)
        safe_m = tl.where(m == neg_inf, 0.0, m)
        log_l_all = _log_sum(l)  # log softmax(x / T)_j = (x_j - m) / T - log_l_all
        log_l_u = tl.log(l_u)  # log softmax(x / T)_j over the unlisted j = (x_j - m_u) / T - log_l_u
        if NEEDS_SOFT:
            lp = tl.load(lp_ptr + row * lp_stride + ks, mask=counted, other=neg_inf).to(ACC)
            logp_t = _log_softmax_vec(lp, inv_t)
            if TAIL:
                log_l = tl.where(covers, 0.0, tl.minimum(_lse_vec(lp), 0.0))
                logp = tl.where(counted, tl.where(log_l == neg_inf, neg_inf, logp_t + log_l), neg_inf)
                lp_tail = _log_one_minus_exp(log_l)
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
    chosen = kernel_switches(_sparse_kd_loss_kernel, h, labels is not None)  # (the CE's statistics: always its own)
    acc, tl_acc = acc_dtype(student_logits)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
        labels_in_range(op, labels, v, ignore_index)
    read = torch.ones_like(teacher_indices, dtype=torch.bool) if teacher_mask is None else teacher_mask.bool()
    if labels is not None:
        read = read & (labels != ignore_index)[:, None]
    teacher_indices_in_range(op, teacher_indices, read, v)
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
    rows_defined(op, rows, "student_logits or teacher_logprobs")
    return reduce_rows(rows, reduction, divisor), grad


# The columns of the slice ops' statistics and coefficients (lepton_fast.ops.sparse_kd_loss),
# as constants the kernels can read.
SP_MAX, SP_MAX_UNLISTED, SP_SUM, SP_SUM_UNLISTED, SP_SUM_CE, SP_LIN_CE, SP_ENTRIES = (
    tl.constexpr(c) for c in (ops.SP_MAX, ops.SP_MAX_UNLISTED, ops.SP_SUM, ops.SP_SUM_UNLISTED, ops.SP_SUM_CE,
                              ops.SP_LIN_CE, ops.SP_ENTRIES))
GR_MAX, GR_MAX_UNLISTED, GR_CONST, GR_SOFTMAX, GR_UNLISTED, GR_SOFTMAX_CE, GR_LABEL, GR_ENTRIES = (
    tl.constexpr(c) for c in (ops.GR_MAX, ops.GR_MAX_UNLISTED, ops.GR_CONST, ops.GR_SOFTMAX, ops.GR_UNLISTED,
                              ops.GR_SOFTMAX_CE, ops.GR_LABEL, ops.GR_ENTRIES))


@triton.jit
def _sparse_slice_stats_kernel(
    s_ptr, col_ptr, y_ptr, out_ptr, C, K, s_stride, class_offset, n_classes,
    inv_t: tl.float64, label_smoothing: tl.float64, ignore_index,
    TAIL: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_LABELS: tl.constexpr, ACC: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr,
):
    """sparse_slice_stats: sparse_kd_loss's pass over a row (_row_pass) on the row's slice of
    C columns, the listed columns' logits merged in for the row's statistics under "tail"."""
    neg_inf = float("-inf")
    inv_t = tl.full([], inv_t, ACC)
    label_smoothing = tl.full([], label_smoothing, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    ks = tl.arange(0, KB)
    in_k = ks < K
    ignored, label = _label_of_row(y_ptr, row, C, class_offset, ignore_index, HAS_LABELS)
    # What the terms do not need, and an ignored row, keep these: maxima -inf, the rest 0.
    m = tl.full([], neg_inf, ACC)
    m_u = tl.full([], neg_inf, ACC)
    l = tl.zeros([], ACC)
    l_u = tl.zeros([], ACC)
    l1 = tl.zeros([], ACC)
    lin = tl.zeros([], ACC)
    entries = tl.zeros([KB], ACC)
    if not ignored:
        col = tl.load(col_ptr + row * K + ks, mask=in_k, other=-1)
        listed = col >= 0
        m_u, l_u, m1, l1, sum_x = _row_pass(s_row, C, col, listed, inv_t, TAIL and NEEDS_SOFT, NEEDS_CE, SMOOTH,
                                            ACC, BLOCK)
        if NEEDS_SOFT:
            xk = tl.load(s_row + col, mask=listed, other=neg_inf).to(ACC)
            entries = tl.where(listed, xk, 0.0)
            if TAIL:
                m, l = _with_entries(m_u, l_u, xk, inv_t)
        if NEEDS_CE:
            m = m1  # (under "tail", the same max as _with_entries')
            x_label = tl.load(s_row + tl.maximum(label, 0), mask=label >= 0, other=0.0).to(ACC)
            lin = tl.where(label >= 0, (1.0 - label_smoothing) * x_label, 0.0)
            if SMOOTH:
                lin += label_smoothing / n_classes * sum_x
    out = out_ptr + row * (SP_ENTRIES + K)
    tl.store(out + SP_MAX, m)
    tl.store(out + SP_MAX_UNLISTED, m_u)
    tl.store(out + SP_SUM, l)
    tl.store(out + SP_SUM_UNLISTED, l_u)
    tl.store(out + SP_SUM_CE, l1)
    tl.store(out + SP_LIN_CE, lin)
    tl.store(out + SP_ENTRIES + ks, entries, mask=in_k)


@triton.jit
def _dense_term(dv, c, x, m, scale):
    """dv + c exp((x - m) * scale), nothing added (no exp) where the coefficient c is 0."""
    if c != 0:
        dv += c * tl.exp((x - m) * scale)
    return dv


@triton.jit
def _sparse_slice_grad_kernel(
    s_ptr, col_ptr, y_ptr, coef_ptr, g_ptr, C, K, s_stride, class_offset, inv_t: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, ACC: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr,
):
    """sparse_slice_grad: the formula of every column over the row's slice of C columns (as
    the fused kernel, an unlisted column's at every column), then, after a barrier, each listed
    column's own (no unlisted term; its entry's coefficient)."""
    inv_t = tl.full([], inv_t, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    g_row = g_ptr + row * C
    ignored, label = _label_of_row(y_ptr, row, C, class_offset, ignore_index, HAS_LABELS)
    if ignored:
        store_zeros(g_row, C, BLOCK)
    else:
        cf = coef_ptr + row * (GR_ENTRIES + K)
        m = tl.load(cf + GR_MAX)
        m_u = tl.load(cf + GR_MAX_UNLISTED)
        c0 = tl.load(cf + GR_CONST)
        ct = tl.load(cf + GR_SOFTMAX)
        cu = tl.load(cf + GR_UNLISTED)
        c1 = tl.load(cf + GR_SOFTMAX_CE)
        c_label = tl.load(cf + GR_LABEL)
        if inv_t == 1.0:  # the CE's softmax is the soft term's: one exp
            ct += c1
            c1 = tl.zeros_like(c1)
        cols0 = tl.arange(0, BLOCK)
        for off in range(0, C, BLOCK):
            cols = off + cols0
            x = tl.load(s_row + cols, mask=cols < C, other=0.0).to(ACC)
            dv = tl.full([BLOCK], c0, ACC)
            dv = _dense_term(dv, ct, x, m, inv_t)
            # At most 1 at an unlisted column; the cap keeps the listed ones (rewritten below) finite.
            dv = _dense_term(dv, cu, tl.minimum(x, m_u), m_u, inv_t)
            dv = _dense_term(dv, c1, x, m, 1.0)
            dv += tl.where(cols == label, c_label, 0.0)
            tl.store(g_row + cols, dv.to(g_row.dtype.element_ty), mask=cols < C)
        tl.debug_barrier()  # the listed columns over the values above, from every thread
        ks = tl.arange(0, KB)
        col = tl.load(col_ptr + row * K + ks, mask=ks < K, other=-1)
        listed = col >= 0
        xk = tl.load(s_row + col, mask=listed, other=0.0).to(ACC)
        dk = c0 + tl.load(cf + GR_ENTRIES + ks, mask=listed, other=0.0) + tl.where(col == label, c_label, 0.0)
        dk = _dense_term(dk, ct, xk, m, inv_t)
        dk = _dense_term(dk, c1, xk, m, 1.0)
        tl.store(g_row + col, dk.to(g_row.dtype.element_ty), mask=listed)


class _SliceLaunch:
    """What both slice launchers check and pass their kernel (the CPU kernels' prepare_slice):
    the [N, C_r] slice, its entries' columns [N, K] and the labels (class ids of the whole
    row), the accumulation dtype, the blocks."""

    def __init__(self, op, student_logits, column, labels, block):
        if student_logits.dim() != 2 or student_logits.stride(1) != 1:
            raise ValueError(f"{op}: student_logits must be [N, C] with rows contiguous along C")
        n, c = student_logits.shape
        if column.dim() != 2 or column.shape[0] != n or column.dtype != torch.int64:
            raise ValueError(f"{op}: column must be an int64 [{n}, K] tensor, got {tuple(column.shape)} {column.dtype}")
        if labels is not None and labels.shape != (n,):
            raise ValueError(f"{op}: labels must be [{n}], got {tuple(labels.shape)}")
        slice_columns(op, column, c)
        self.n_rows, self.slice_classes, self.k = n, c, column.shape[1]
        self.column = column.contiguous()
        self.labels = None if labels is None else labels.to(torch.int64).contiguous()
        self.acc, self.tl_acc = acc_dtype(student_logits)
        self.block = column_block(c, block)
        self.constexprs = dict(HAS_LABELS=labels is not None, ACC=self.tl_acc, KB=entry_block(self.k),
                               BLOCK=self.block)
        self.num_warps = num_warps(self.block)

    def labels_or(self, fallback):
        return self.labels if self.labels is not None else fallback


def sparse_slice_stats(student_logits, column, labels, hyper, truncation, ignore_index, class_offset, n_classes, *,
                       block=None):
    """The contract of ``torch.ops.lepton_fast.sparse_slice_stats`` (lepton_fast/ops/sparse_kd_loss.py):
    [N, SP_ENTRIES + K] in the accumulation dtype. ``block`` overrides the column block, for tests."""
    op = "sparse_slice_stats"
    choice("truncation", truncation, ops.TRUNCATIONS)
    slice_of_rows(op, student_logits, labels, ignore_index, class_offset, n_classes)
    call = _SliceLaunch(op, student_logits, column, labels, block)
    h = kd_values(hyper)
    chosen = kernel_switches(_sparse_slice_stats_kernel, h, labels is not None)
    out = torch.empty(call.n_rows, ops.SP_ENTRIES + call.k, dtype=call.acc, device=student_logits.device)
    if call.n_rows:
        _sparse_slice_stats_kernel[(call.n_rows,)](
            student_logits, call.column, call.labels_or(out), out, call.slice_classes, call.k,
            student_logits.stride(0), class_offset, n_classes, 1.0 / h["temperature"], h["label_smoothing"],
            ignore_index, TAIL=truncation == "tail", num_warps=call.num_warps, **dict(chosen, **call.constexprs),
        )
    return out


def sparse_slice_grad(student_logits, column, labels, coefficients, hyper, ignore_index, class_offset, *,
                      block=None):
    """The contract of ``torch.ops.lepton_fast.sparse_slice_grad`` (lepton_fast/ops/sparse_kd_loss.py):
    d(loss)/d(the slice) in the student's dtype. The labels were checked by sparse_slice_stats (a
    label outside the slice has no column here)."""
    op = "sparse_slice_grad"
    slice_of_rows(op, student_logits, None, ignore_index, class_offset, class_offset + student_logits.shape[1])
    call = _SliceLaunch(op, student_logits, column, labels, block)
    width = ops.GR_ENTRIES + call.k
    if coefficients.shape != (call.n_rows, width) or not coefficients.is_contiguous() or coefficients.dtype != call.acc:
        raise ValueError(f"{op}: coefficients must be a contiguous [{call.n_rows}, {width}] {call.acc} tensor, "
                         f"got {tuple(coefficients.shape)} {coefficients.dtype}")
    grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
    if call.n_rows:
        _sparse_slice_grad_kernel[(call.n_rows,)](
            student_logits, call.column, call.labels_or(coefficients), coefficients, grad, call.slice_classes, call.k,
            student_logits.stride(0), class_offset, 1.0 / kd_values(hyper)["temperature"], ignore_index,
            num_warps=call.num_warps, **call.constexprs,
        )
    return grad


def entry_block(k: int) -> int:
    """The block of lanes the teacher's K entries sit in: 16 upwards."""
    return max(triton.next_power_of_2(k), 16)


def compile_targets():
    """Every variant the launchers above can pick, for tests/test_triton_aot.py:
    [(kernel, signature, constexprs, options)], derived from their definitions: per student
    dtype, for sparse_kd_loss the log-probabilities' dtype (the student's, or float32), the
    kernel's switch_variants() (kernels/kd_loss.py), truncation, mask given, gradient wanted;
    for the slice ops the stats kernel's switch_variants() and truncation, the gradient
    kernel's labels given; for each, the entries' block KB (two sizes listed) and the column
    block (BLOCKS, with its num_warps). An absent mask or labels gets a buffer of the
    accumulation dtype in its place (the row losses, the statistics, the coefficients)."""
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
        # The slice ops: the stats kernel's switches and truncation, the gradient kernel's labels.
        variants = [(_sparse_slice_stats_kernel, dict(chosen, TAIL=tail))
                    for chosen, tail in itertools.product(switch_variants(_sparse_slice_stats_kernel), (False, True))]
        variants += [(_sparse_slice_grad_kernel, {"HAS_LABELS": has_labels}) for has_labels in (False, True)]
        for (kernel, chosen), kb, block in itertools.product(variants, (entry_block(1), entry_block(100)), BLOCKS):
            pointers = {"s_ptr": f"*{dtype}", "col_ptr": "*i64", "g_ptr": f"*{dtype}",
                        "y_ptr": "*i64" if chosen["HAS_LABELS"] else f"*{acc}"}
            constexprs = {**chosen, "ACC": tl.float64 if acc == "fp64" else tl.float32, "KB": kb, "BLOCK": block}
            targets.append((kernel, signature(kernel, pointers, f"*{acc}"), constexprs,
                            {"num_warps": num_warps(block)}))
    return targets
