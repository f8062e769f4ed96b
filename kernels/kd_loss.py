"""Triton kernels of fused_kd_loss and the kd_slice_* ops (schemas: lepton_fast/ops/kd_loss.py), the same
contract as the C++ kernels.

A row's steps (csrc/kd_loss.h documents them and the formulas) are ``@triton.jit`` functions
below: ``_row_stats`` (step 1), ``_row_jsd_sums`` (step 2, JSD only), ``_row_consts`` (step 3)
and ``_row_grad`` (step 4). ``_kd_loss_kernel`` composes them, one program per row, for
fused_kd_loss (all four) and kd_slice_loss (3 and 4 from merged statistics); the two other
kernels run step 1 and step 2 on a slice of the columns.

Each program walks its row in column blocks, so a row of any width (C >= 64k included) runs
in a fixed number of registers. Step 1 keeps online softmax statistics (running max and sum
of exponentials) of student and teacher, and for forward/reverse KL also the running sum A
that gives the divergence in the same pass (kl_from_sums in csrc/kd_loss.h), of the logits'
offsets from their rows' maxima u = (x_p - m_p) / T, v = (x_q - m_q) / T:

    A = sum exp(u) (u - v),  KL(p || q) = A / S_p + log(S_q / S_p),

re-centred whenever a block raises a max (recentred_kl_sum).

The statistics keep the max of the raw logits x, and every exponent is (x - max) / T
(csrc/kd_loss.h, KDRowStats): exact at the max, accurate for every T in 1e-8 ... 1e4.

The last pass writes the gradient (already times grad_scale). JSD needs log m, which depends
on both row constants, so it takes one more pass for the divergence and its gradient
constant. fused_kd_loss reads its inputs twice (three times for JSD) and writes the gradient
once; each pass walks the row in the direction opposite to the one before, so that a re-read
starts on the columns most recently loaded, the ones most likely to be still in L2.
Accumulation is float32 (float64 for float64 inputs). Per-row losses are written, never
atomically added, so the reduction the Python layer does on them is deterministic.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from lepton_fast._validate import DIVERGENCES, kd_values, labels_in_range, rows_defined
from lepton_fast.ops.kd_loss import N_STATS, soft_kind

from ._common import acc_dtype, online_softmax, reduce_rows, signature, store_zeros

# The kernels' DIV constexpr: the divergence's position in the names every layer accepts.
_DIVERGENCES = {name: code for code, name in enumerate(DIVERGENCES)}
# Widest column block: 8 accumulators per element stay in registers at 8 warps.
MAX_BLOCK = 2048


@triton.jit
def _log_mixture(lps, lpt, log_beta, log_1m_beta):
    """log(beta p_t + (1 - beta) p_s); -inf where both are 0."""
    a = lpt + log_beta
    b = lps + log_1m_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - safe)))


@triton.jit
def _weighted(p, d):
    """p * d with 0 * d = 0 for every d (csrc/kd_loss.h, weighted): a class whose probability
    is 0 adds nothing to a KL sum, also where the other side's -inf makes d infinite (the
    teacher's padded classes at finfo.min, the student's at -inf); NaN stays."""
    return tl.where(p == 0.0, 0.0, p * d)


@triton.jit
def _kl_term(logp, logq):
    """p (log p - log q) with 0 log 0 = 0."""
    return _weighted(tl.exp(logp), logp - logq)


@triton.jit
def _rise(m_new, m):
    """How far a running max rises to m_new >= m: 0 where it stays (at -inf too), inf from -inf."""
    return tl.where(m_new == m, 0.0, m_new - m)


@triton.jit
def _recentred_kl_sum(a, s_p, r_p, shift):
    """A re-centred when the maxima rise (csrc/kd_loss.h, recentred_kl_sum): r_p (A + S_p shift)."""
    return _weighted(r_p, a + _weighted(s_p, shift))


@triton.jit
def _kl_sum_terms(e_p, xp, m_p, xq, m_q, inv_t):
    """The block's part of A against the current maxima, sum exp(u) (u - v) with e_p = exp(u):
    0 where p is 0, inf where p > 0 and q is 0 (also while m_q is -inf)."""
    v = tl.where(xq == float("-inf"), xq, xq - m_q)
    return tl.sum(_weighted(e_p, ((xp - m_p) - v) * inv_t), 0)


@triton.jit
def _log_sum(s):
    """log s, the log-sum-exp of (x - max) / T from its sum; NaN where the sum is 0 (no finite entry)."""
    return tl.where(s > 0, tl.log(tl.where(s > 0, s, 1.0)), float("nan"))


@triton.jit
def _row_stats(s_row, t_row, C, label, inv_t, label_smoothing, n_classes,
               DIV: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr, CE_OWN: tl.constexpr,
               SMOOTH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Step 1 on the C columns at s_row, t_row (``label``: its column among them, or -1):
    (max_s, max_t, sum_s, sum_t, kl, sum_ce, lin_ce), KDRowStats of csrc/kd_loss.h."""
    neg_inf = float("-inf")
    cols0 = tl.arange(0, BLOCK)
    m_s = tl.full([], neg_inf, ACC)
    l_s = tl.zeros([], ACC)
    m_t = tl.full([], neg_inf, ACC)
    l_t = tl.zeros([], ACC)
    m_1 = tl.full([], neg_inf, ACC)
    l_1 = tl.zeros([], ACC)
    w_kl = tl.zeros([], ACC)  # A, p = teacher (fwd) or student (rev)
    sum_x = tl.zeros([], ACC)
    for off in range(0, C, BLOCK):
        cols = off + cols0
        mask = cols < C
        xs = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        if NEEDS_SOFT:
            xt = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)
            new_s, new_l_s, e_s, r_s = online_softmax(m_s, l_s, xs, inv_t)
            new_t, new_l_t, e_t, r_t = online_softmax(m_t, l_t, xt, inv_t)
            if DIV == 0:
                shift = (_rise(new_s, m_s) - _rise(new_t, m_t)) * inv_t
                w_kl = _recentred_kl_sum(w_kl, l_t, r_t, shift) + _kl_sum_terms(e_t, xt, new_t, xs, new_s, inv_t)
            elif DIV == 1:
                shift = (_rise(new_t, m_t) - _rise(new_s, m_s)) * inv_t
                w_kl = _recentred_kl_sum(w_kl, l_s, r_s, shift) + _kl_sum_terms(e_s, xs, new_s, xt, new_t, inv_t)
            m_s, l_s, m_t, l_t = new_s, new_l_s, new_t, new_l_t
        if CE_OWN:
            m_1, l_1, _e1, _r1 = online_softmax(m_1, l_1, xs, 1.0)
        if SMOOTH:
            sum_x += tl.sum(tl.where(mask, xs, 0.0), 0)
    sum_ce = l_s
    lin_ce = tl.zeros([], ACC)
    if NEEDS_CE:
        if CE_OWN:
            if NEEDS_SOFT:
                # Against max_s, the same max of the same logits (so the factor is 1).
                sum_ce = tl.where(l_1 > 0, l_1 * tl.exp(tl.where(l_1 > 0, m_1 - m_s, 0.0)), 0.0)
            else:
                m_s = m_1
                sum_ce = l_1
        x_label = tl.load(s_row + tl.maximum(label, 0), mask=label >= 0, other=0.0).to(ACC)
        lin_ce = tl.where(label >= 0, (1.0 - label_smoothing) * x_label, 0.0)
        if SMOOTH:
            lin_ce += label_smoothing / n_classes * sum_x
    return m_s, m_t, l_s, l_t, w_kl, sum_ce, lin_ce


@triton.jit
def _row_jsd_sums(s_row, t_row, C, m_s, lse_s, m_t, lse_t, inv_t, log_beta, log_1m_beta, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Step 2 (JSD): K_t = KL(p_t || m) and K_s = KL(p_s || m) over the C columns, backwards;
    log p = (x - max) / T - lse, from the row's max (m_s, m_t) and log-sum (lse_s, lse_t)."""
    neg_inf = float("-inf")
    cols0 = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(C, BLOCK)
    acc_t = tl.zeros([BLOCK], ACC)
    acc_s = tl.zeros([BLOCK], ACC)
    for k in range(0, n_blocks):
        cols = (n_blocks - 1 - k) * BLOCK + cols0  # backwards: see the module docstring
        mask = cols < C
        lps = (tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC) - m_s) * inv_t - lse_s
        lpt = (tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC) - m_t) * inv_t - lse_t
        lm = _log_mixture(lps, lpt, log_beta, log_1m_beta)
        acc_t += _kl_term(lpt, lm)
        acc_s += _kl_term(lps, lm)
    return tl.sum(acc_t, 0), tl.sum(acc_s, 0)


@triton.jit
def _row_consts(m_s, m_t, l_s, l_t, w_kl, sum_ce, lin_ce, k_t, k_s, inv_t, beta, alpha, soft_w,
                DIV: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr):
    """Step 3: (lse_s, lse_t, lse_ce, k, row loss) from the row's statistics (kd_row_consts):
    lse_s, lse_t of (x - max) / T, lse_ce of the student's logits at T = 1."""
    lse_s = _log_sum(l_s)
    lse_t = _log_sum(l_t)
    lse_ce = lse_s
    k = tl.zeros_like(lse_s)
    row_loss = tl.zeros_like(lse_s)
    if NEEDS_SOFT:
        if DIV == 0:
            div = w_kl / l_t + lse_s - lse_t
        elif DIV == 1:
            div = w_kl / l_s + lse_t - lse_s
            k = div
        else:
            div = beta * k_t + (1.0 - beta) * k_s
            k = k_s
        row_loss += soft_w * tl.where((lse_s != lse_s) | (lse_t != lse_t), float("nan"), div)
    if NEEDS_CE:
        lse_ce = m_s + _log_sum(sum_ce)
        row_loss += alpha * (lse_ce - lin_ce)
    return lse_s, lse_t, lse_ce, k, row_loss


@triton.jit
def _row_grad(s_row, t_row, g_row, C, label, m_s, lse_s, m_t, lse_t, lse_ce, k, inv_t, beta, log_beta, log_1m_beta,
              label_smoothing, soft_scale, ce_scale, n_classes, DIV: tl.constexpr, NEEDS_SOFT: tl.constexpr,
              NEEDS_CE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Step 4: d(row loss)/d(student) of the C columns, times grad_scale (in the scales)."""
    neg_inf = float("-inf")
    cols0 = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(C, BLOCK)
    for kb in range(0, n_blocks):
        if REVERSE:
            cols = (n_blocks - 1 - kb) * BLOCK + cols0
        else:
            cols = kb * BLOCK + cols0
        mask = cols < C
        xs = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        d = tl.zeros([BLOCK], ACC)
        if NEEDS_SOFT:
            xt = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)
            lps = (xs - m_s) * inv_t - lse_s
            lpt = (xt - m_t) * inv_t - lse_t
            ps = tl.exp(lps)
            if DIV == 0:
                d = ps - tl.exp(lpt)
            elif DIV == 1:
                d = _weighted(ps, lps - lpt - k)
            else:
                lm = _log_mixture(lps, lpt, log_beta, log_1m_beta)
                d = (1.0 - beta) * _weighted(ps, lps - lm - k)
            d = d * soft_scale
        if NEEDS_CE:
            q = tl.exp(xs - lse_ce)
            onehot = tl.where(cols == label, 1.0 - label_smoothing, 0.0)
            d += ce_scale * (q - label_smoothing / n_classes - onehot)
        tl.store(g_row + cols, d.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _in_acc(inv_t, beta, log_beta, log_1m_beta, alpha, label_smoothing, soft_w, soft_gw, ACC: tl.constexpr):
    """The KD kernels' float64 scalar arguments in the accumulation dtype."""
    return (tl.full([], inv_t, ACC), tl.full([], beta, ACC), tl.full([], log_beta, ACC),
            tl.full([], log_1m_beta, ACC), tl.full([], alpha, ACC), tl.full([], label_smoothing, ACC),
            tl.full([], soft_w, ACC), tl.full([], soft_gw, ACC))


@triton.jit
def _label_of_row(y_ptr, row, C, class_offset, ignore_index, HAS_LABELS: tl.constexpr):
    """(whether the row is ignored, the label's column among the slice's C or -1)."""
    ignored = False
    here = tl.full([], -1, tl.int64)
    if HAS_LABELS:
        label = tl.load(y_ptr + row)
        ignored = label == ignore_index
        column = label - class_offset
        here = tl.where((label != ignore_index) & (column >= 0) & (column < C), column, -1)
    return ignored, here


@triton.jit
def _kd_loss_kernel(
    s_ptr, t_ptr, y_ptr, g_ptr, loss_ptr, gs_ptr, stats_ptr, jsd_ptr,
    C, s_stride, t_stride, class_offset, n_classes,
    # Float scalars arrive as float64 so that float64 inputs keep full precision.
    inv_t: tl.float64, beta: tl.float64, log_beta: tl.float64, log_1m_beta: tl.float64,
    alpha: tl.float64, label_smoothing: tl.float64, soft_w: tl.float64, soft_gw: tl.float64, ignore_index,
    DIV: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr, CE_OWN: tl.constexpr,
    SMOOTH: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, FROM_STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """fused_kd_loss (steps 1-4 per row), or kd_slice_loss when FROM_STATS (3-4 from the
    merged statistics at stats_ptr and JSD sums at jsd_ptr)."""
    inv_t, beta, log_beta, log_1m_beta, alpha, label_smoothing, soft_w, soft_gw = _in_acc(
        inv_t, beta, log_beta, log_1m_beta, alpha, label_smoothing, soft_w, soft_gw, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * C
    ignored, label = _label_of_row(y_ptr, row, C, class_offset, ignore_index, HAS_LABELS)
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, C, BLOCK)
    else:
        k_t = tl.zeros([], ACC)
        k_s = tl.zeros([], ACC)
        if FROM_STATS:
            st = stats_ptr + row * 7
            m_s = tl.load(st + 0)
            m_t = tl.load(st + 1)
            l_s = tl.load(st + 2)
            l_t = tl.load(st + 3)
            w_kl = tl.load(st + 4)
            sum_ce = tl.load(st + 5)
            lin_ce = tl.load(st + 6)
            if NEEDS_SOFT and DIV == 2:
                k_t = tl.load(jsd_ptr + row * 2)
                k_s = tl.load(jsd_ptr + row * 2 + 1)
        else:
            m_s, m_t, l_s, l_t, w_kl, sum_ce, lin_ce = _row_stats(
                s_row, t_row, C, label, inv_t, label_smoothing, n_classes,
                DIV, NEEDS_SOFT, NEEDS_CE, CE_OWN, SMOOTH, ACC, BLOCK)
            if NEEDS_SOFT and DIV == 2:
                k_t, k_s = _row_jsd_sums(s_row, t_row, C, m_s, _log_sum(l_s), m_t, _log_sum(l_t), inv_t, log_beta,
                                         log_1m_beta, ACC, BLOCK)
        lse_s, lse_t, lse_ce, k, row_loss = _row_consts(m_s, m_t, l_s, l_t, w_kl, sum_ce, lin_ce, k_t, k_s,
                                                        inv_t, beta, alpha, soft_w, DIV, NEEDS_SOFT, NEEDS_CE)
        tl.store(loss_ptr + row, row_loss)
        if COMPUTE_GRAD:
            gs = tl.load(gs_ptr).to(ACC)
            # Against the direction of the previous pass (JSD's step 2 went backwards).
            _row_grad(s_row, t_row, g_row, C, label, m_s, lse_s, m_t, lse_t, lse_ce, k, inv_t, beta, log_beta,
                      log_1m_beta, label_smoothing, soft_gw * gs, alpha * gs, n_classes, DIV, NEEDS_SOFT, NEEDS_CE,
                      DIV != 2, ACC, BLOCK)


@triton.jit
def _kd_slice_stats_kernel(
    s_ptr, t_ptr, y_ptr, out_ptr, C, s_stride, t_stride, class_offset, n_classes,
    inv_t: tl.float64, label_smoothing: tl.float64, ignore_index,
    DIV: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr, CE_OWN: tl.constexpr,
    SMOOTH: tl.constexpr, HAS_LABELS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """kd_slice_stats: step 1 per row, zeros at ignored rows."""
    inv_t = tl.full([], inv_t, ACC)
    label_smoothing = tl.full([], label_smoothing, ACC)
    row = tl.program_id(0).to(tl.int64)
    ignored, label = _label_of_row(y_ptr, row, C, class_offset, ignore_index, HAS_LABELS)
    out = out_ptr + row * 7
    if ignored:
        for i in range(0, 7):
            tl.store(out + i, tl.zeros([], ACC))
    else:
        m_s, m_t, l_s, l_t, w_kl, sum_ce, lin_ce = _row_stats(
            s_ptr + row * s_stride, t_ptr + row * t_stride, C, label, inv_t, label_smoothing, n_classes,
            DIV, NEEDS_SOFT, NEEDS_CE, CE_OWN, SMOOTH, ACC, BLOCK)
        tl.store(out + 0, m_s)
        tl.store(out + 1, m_t)
        tl.store(out + 2, l_s)
        tl.store(out + 3, l_t)
        tl.store(out + 4, w_kl)
        tl.store(out + 5, sum_ce)
        tl.store(out + 6, lin_ce)


@triton.jit
def _kd_slice_jsd_kernel(
    s_ptr, t_ptr, y_ptr, stats_ptr, out_ptr, C, s_stride, t_stride,
    inv_t: tl.float64, log_beta: tl.float64, log_1m_beta: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """kd_slice_jsd_sums: step 2 per row from the merged statistics, zeros at ignored rows."""
    inv_t = tl.full([], inv_t, ACC)
    log_beta = tl.full([], log_beta, ACC)
    log_1m_beta = tl.full([], log_1m_beta, ACC)
    row = tl.program_id(0).to(tl.int64)
    ignored, _label = _label_of_row(y_ptr, row, C, 0, ignore_index, HAS_LABELS)
    k_t = tl.zeros([], ACC)
    k_s = tl.zeros([], ACC)
    if not ignored:
        st = stats_ptr + row * 7
        k_t, k_s = _row_jsd_sums(s_ptr + row * s_stride, t_ptr + row * t_stride, C, tl.load(st + 0),
                                 _log_sum(tl.load(st + 2)), tl.load(st + 1), _log_sum(tl.load(st + 3)), inv_t,
                                 log_beta, log_1m_beta, ACC, BLOCK)
    tl.store(out_ptr + row * 2, k_t)
    tl.store(out_ptr + row * 2 + 1, k_s)


def switches(h: dict, has_labels: bool) -> dict:
    """The KD kernels' constexpr switches for one call's hyper-parameters ``h`` (by name, as
    lepton_fast._validate.kd_values gives them): the one definition the launchers use and
    :func:`compile_targets` enumerates (through :func:`switch_variants`).
    DIV: the divergence computed (beta 0 / 1 run the JSD as forward / reverse KL, soft_kind);
    CE_OWN: the CE needs softmax statistics of its own (at T = 1 when the soft term's are at
    T != 1, or without a soft term); SMOOTH: the CE needs the row's sum of logits."""
    needs_soft, needs_ce = h["alpha"] < 1, h["alpha"] > 0
    return {"DIV": _DIVERGENCES[soft_kind(h["divergence"], h["beta"])], "NEEDS_SOFT": needs_soft,
            "NEEDS_CE": needs_ce, "CE_OWN": needs_ce and (not needs_soft or h["temperature"] != 1.0),
            "SMOOTH": needs_ce and h["label_smoothing"] > 0, "HAS_LABELS": has_labels}


def soft_weights(h: dict) -> tuple[float, float, float]:
    """(1 / T, the soft term's weight (1 - alpha) (T^2 or 1), that weight / T, which multiplies
    dD/dz): the row constants every KD launcher passes its kernel (KDParams in csrc/kd_loss.h)."""
    t = h["temperature"]
    weight = (1.0 - h["alpha"]) * (t * t if h["scale_by_t2"] else 1.0)
    return 1.0 / t, weight, weight / t


def switch_variants(kernel) -> list[dict]:
    """Every distinct value of the :func:`switches` that ``kernel`` takes, over the calls the
    checks accept: each divergence, beta and alpha at both ends and between, T at 1 and not,
    smoothing off and on, labels given or not (always given when alpha > 0:
    _validate.kd_options requires them for the CE)."""
    variants = {}
    for divergence, beta, alpha, t, smoothing, has_labels in itertools.product(
            DIVERGENCES, (0.0, 0.5, 1.0), (0.0, 0.5, 1.0), (1.0, 2.0), (0.0, 0.1), (False, True)):
        if alpha > 0 and not has_labels:
            continue
        h = {"divergence": divergence, "beta": beta, "alpha": alpha, "temperature": t, "label_smoothing": smoothing}
        chosen = kernel_switches(kernel, h, has_labels)
        variants.setdefault(tuple(chosen.items()), chosen)
    return list(variants.values())


def kernel_switches(kernel, h: dict, has_labels: bool) -> dict:
    """The :func:`switches` that ``kernel`` takes (its parameters by name: a JITFunction's and, under
    TRITON_INTERPRET=1, an InterpretedFunction's ``arg_names``)."""
    taken = set(kernel.arg_names)
    return {k: v for k, v in switches(h, has_labels).items() if k in taken}


def mixture_logs(beta: float) -> tuple[float, float]:
    """(log beta, log(1 - beta)), -inf at the ends: the JSD mixture's weights in log space."""
    return math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf


def column_block(n_columns: int, block: int | None = None) -> int:
    """The column block a launcher picks for rows of n_columns (``block`` overrides it, for tests)."""
    return block or min(max(triton.next_power_of_2(n_columns), 16), MAX_BLOCK)


def num_warps(block: int) -> int:
    """Warps per program for a column block: 8 for the widest, whose accumulators need them."""
    return 8 if block >= 2048 else 4


# Every column block column_block() can pick: 16 .. MAX_BLOCK.
BLOCKS = tuple(16 << i for i in range((MAX_BLOCK // 16).bit_length()))


class _Launch:
    """The host-side part every launcher shares: the checks of the logits, the resolved
    hyper-parameters and switches, and the launch grid and block. ``slice_classes`` is the
    columns the kernels read (a slice of rows of n_classes, or the whole row)."""

    def __init__(self, op, student_logits, teacher_logits, labels, hyper, ignore_index, block):
        if student_logits.dim() != 2 or student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
            raise ValueError(f"{op}: logits must be [N, C] with rows contiguous along C")
        if teacher_logits.shape != student_logits.shape or teacher_logits.dtype != student_logits.dtype:
            raise ValueError(f"{op}: student and teacher logits must have the same shape and dtype")
        self.op, self.ignore_index = op, ignore_index
        self.h = kd_values(hyper)
        self.inv_t, self.soft_weight, self.soft_grad_weight = soft_weights(self.h)
        self.n_rows, self.slice_classes = student_logits.shape
        self.acc, self.tl_acc = acc_dtype(student_logits)
        self.labels = None if labels is None else labels.to(torch.int64).contiguous()
        self.block = column_block(self.slice_classes, block)
        self.log_beta, self.log_1m_beta = mixture_logs(self.h["beta"])
        self.flags = dict(switches(self.h, labels is not None), ACC=self.tl_acc, BLOCK=self.block)
        self.num_warps = num_warps(self.block)

    def check_slice(self, class_offset, n_classes):
        if not (0 <= class_offset and class_offset + self.slice_classes <= n_classes):
            raise ValueError(f"{self.op}: a slice of {self.slice_classes} columns at class_offset={class_offset} "
                             f"does not fit in n_classes={n_classes}")
        if self.labels is not None:
            labels_in_range(self.op, self.labels, n_classes, self.ignore_index)

    def labels_or(self, fallback):
        return self.labels if self.labels is not None else fallback


def _merged(op, x, call, width):
    if x.shape != (call.n_rows, width) or not x.is_contiguous() or x.dtype != call.acc:
        raise ValueError(f"{op}: merged statistics must be a contiguous [{call.n_rows}, {width}] {call.acc} tensor, "
                         f"got {tuple(x.shape)} {x.dtype}")
    return x


def _loss_and_grad(op, student_logits, teacher_logits, labels, stats, jsd_sums, hyper, ignore_index, reduction,
                   num_items_in_batch, class_offset, n_classes, compute_grad, block):
    """fused_kd_loss (stats None) or kd_slice_loss: the loss as ``reduction`` asks, and the gradient."""
    call = _Launch(op, student_logits, teacher_logits, labels, hyper, ignore_index, block)
    call.check_slice(class_offset, n_classes)
    jsd = call.flags["NEEDS_SOFT"] and call.flags["DIV"] == _DIVERGENCES["jsd"]
    if stats is not None:
        _merged(op, stats, call, N_STATS)
        if jsd:
            if jsd_sums is None:
                raise ValueError(f"{op}: the JSD needs jsd_sums")
            _merged(op, jsd_sums, call, 2)
    rows = torch.empty(call.n_rows, dtype=call.acc, device=student_logits.device)
    grad = (torch.empty_like(student_logits, memory_format=torch.contiguous_format) if compute_grad
            else student_logits.new_empty((0,)))
    divisor = max(call.n_rows, 1)
    if call.labels is not None:
        divisor = (call.labels != ignore_index).sum().clamp(min=1)
    if num_items_in_batch is not None:
        divisor, reduction = num_items_in_batch, "mean"  # the sum over this count instead
    divides = reduction in ("mean", "batchmean")
    grad_scale = torch.as_tensor(divisor if divides else 1, dtype=torch.float64, device=student_logits.device)
    grad_scale = 1.0 / grad_scale
    if call.n_rows:
        _kd_loss_kernel[(call.n_rows,)](
            student_logits, teacher_logits, call.labels_or(rows), grad, rows, grad_scale,
            rows if stats is None else stats, rows if not (stats is not None and jsd) else jsd_sums,
            call.slice_classes, student_logits.stride(0), teacher_logits.stride(0), class_offset, n_classes,
            call.inv_t, call.h["beta"], call.log_beta, call.log_1m_beta, call.h["alpha"], call.h["label_smoothing"],
            call.soft_weight, call.soft_grad_weight, ignore_index, COMPUTE_GRAD=compute_grad, FROM_STATS=stats is not None,
            num_warps=call.num_warps, **call.flags,
        )
    rows_defined(op, rows, "student_logits or teacher_logits")
    return reduce_rows(rows, reduction, divisor), grad


def fused_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    hyper: torch.Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: torch.Tensor | None,
    compute_grad: bool,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss as ``reduction`` asks, d(loss)/d(student) or an empty tensor): the contract of
    ``torch.ops.lepton_fast.fused_kd_loss`` (lepton_fast/ops/kd_loss.py). ``block`` overrides the column
    block (a power of two), for tests."""
    return _loss_and_grad("fused_kd_loss", student_logits, teacher_logits, labels, None, None, hyper, ignore_index,
                          reduction, num_items_in_batch, 0, student_logits.shape[-1], compute_grad, block)


def kd_slice_loss(student_logits, teacher_logits, labels, stats, jsd_sums, hyper, ignore_index, reduction,
                  num_items_in_batch, class_offset, n_classes, compute_grad, *, block=None):
    """The contract of ``torch.ops.lepton_fast.kd_slice_loss`` (lepton_fast/ops/kd_loss.py)."""
    return _loss_and_grad("kd_slice_loss", student_logits, teacher_logits, labels, stats, jsd_sums, hyper,
                          ignore_index, reduction, num_items_in_batch, class_offset, n_classes, compute_grad, block)


def kd_slice_stats(student_logits, teacher_logits, labels, hyper, ignore_index, class_offset, n_classes, *,
                   block=None):
    """The contract of ``torch.ops.lepton_fast.kd_slice_stats`` (lepton_fast/ops/kd_loss.py)."""
    call = _Launch("kd_slice_stats", student_logits, teacher_logits, labels, hyper, ignore_index, block)
    call.check_slice(class_offset, n_classes)
    out = torch.empty(call.n_rows, N_STATS, dtype=call.acc, device=student_logits.device)
    if call.n_rows:
        _kd_slice_stats_kernel[(call.n_rows,)](
            student_logits, teacher_logits, call.labels_or(out), out, call.slice_classes, student_logits.stride(0),
            teacher_logits.stride(0), class_offset, n_classes, call.inv_t, call.h["label_smoothing"], ignore_index,
            num_warps=call.num_warps, **call.flags,
        )
    return out


def kd_slice_jsd_sums(student_logits, teacher_logits, labels, stats, hyper, ignore_index, *, block=None):
    """The contract of ``torch.ops.lepton_fast.kd_slice_jsd_sums`` (lepton_fast/ops/kd_loss.py)."""
    call = _Launch("kd_slice_jsd_sums", student_logits, teacher_logits, labels, hyper, ignore_index, block)
    _merged("kd_slice_jsd_sums", stats, call, N_STATS)
    out = torch.empty(call.n_rows, 2, dtype=call.acc, device=student_logits.device)
    if call.n_rows:
        _kd_slice_jsd_kernel[(call.n_rows,)](
            student_logits, teacher_logits, call.labels_or(out), stats, out, call.slice_classes,
            student_logits.stride(0), teacher_logits.stride(0), call.inv_t, call.log_beta, call.log_1m_beta,
            ignore_index, HAS_LABELS=call.flags["HAS_LABELS"], ACC=call.tl_acc, BLOCK=call.block,
            num_warps=call.num_warps,
        )
    return out


def compile_targets():
    """Every variant the launchers above can pick, for tests/test_triton_aot.py, which
    compiles them ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Derived from the launchers' own definitions: per dtype and column block (BLOCKS, with
    its num_warps), each kernel's switch_variants(), and for _kd_loss_kernel also the
    gradient wanted and FROM_STATS (kd_slice_loss). Absent buffers get the row-loss (or
    output) buffer in their place: without labels y_ptr, without stats stats_ptr and jsd_ptr.
    """
    targets = []
    for dtype, block in itertools.product(("fp32", "bf16", "fp16", "fp64"), BLOCKS):
        acc = "fp64" if dtype == "fp64" else "fp32"
        tl_acc = tl.float64 if acc == "fp64" else tl.float32
        for kernel in (_kd_slice_jsd_kernel, _kd_slice_stats_kernel, _kd_loss_kernel):
            more = [{}]
            if kernel is _kd_loss_kernel:
                more = [{"COMPUTE_GRAD": g, "FROM_STATS": f} for g, f in itertools.product((False, True), repeat=2)]
            for chosen, extra in itertools.product(switch_variants(kernel), more):
                constexprs = {**chosen, **extra, "ACC": tl_acc, "BLOCK": block}
                pointers = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "gs_ptr": "*fp64",
                            "y_ptr": "*i64" if chosen["HAS_LABELS"] else f"*{acc}"}
                targets.append((kernel, signature(kernel, pointers, f"*{acc}"), constexprs,
                                {"num_warps": num_warps(block)}))
    return targets
