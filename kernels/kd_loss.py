"""Triton kernel of fused_kd_loss (schema: csrc/ops.cpp), the same contract as the C++ kernels.

One program per row walks the row in column blocks, so a row of any width (C >= 64k
included) runs in a fixed number of registers. Pass 1 keeps online softmax statistics
(running max and sum of exponentials) of student and teacher, and for forward/reverse KL
also the running sum E_p[z_p - z_q] that gives the divergence in the same pass:

    KL(p || q) = E_p[z_p - z_q] - lse_p + lse_q,  z = logits / T.

The last pass writes the gradient (already times grad_scale). JSD needs log m, which depends
on both row constants, so it takes one more pass for the divergence and its gradient
constant. Inputs are read twice (three times for JSD) and the gradient written once; each
pass walks the row in the direction opposite to the one before, so that a re-read starts
on the columns most recently loaded, the ones most likely to be still in L2.
Accumulation is float32 (float64 for float64 inputs). Per-row losses are written, never
atomically added, so the reduction the Python layer does on them is deterministic.

The per-element math mirrors csrc/kd_loss.h, which documents the formulas.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, check_labels, check_rows_defined, lse, online_softmax, reduce_rows, scalar,
                      store_zeros)

_DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
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
def _kl_term(logp, logq):
    """p (log p - log q) with 0 log 0 = 0."""
    return tl.where(logp == float("-inf"), 0.0, tl.exp(logp) * (logp - logq))


@triton.jit
def _kd_loss_kernel(
    s_ptr, t_ptr, y_ptr, g_ptr, loss_ptr, gs_ptr,
    C, s_stride, t_stride,
    # Float scalars arrive as float64 so that float64 inputs keep full precision.
    inv_t: tl.float64, beta: tl.float64, log_beta: tl.float64, log_1m_beta: tl.float64,
    alpha: tl.float64, eps: tl.float64, soft_w: tl.float64, soft_gw: tl.float64, ignore_index,
    DIV: tl.constexpr, NEEDS_SOFT: tl.constexpr, NEEDS_CE: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    inv_t = tl.full([], inv_t, ACC)
    beta = tl.full([], beta, ACC)
    log_beta = tl.full([], log_beta, ACC)
    log_1m_beta = tl.full([], log_1m_beta, ACC)
    alpha = tl.full([], alpha, ACC)
    eps = tl.full([], eps, ACC)
    soft_w = tl.full([], soft_w, ACC)
    soft_gw = tl.full([], soft_gw, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * C
    cols0 = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(C, BLOCK)
    neg_inf = float("-inf")
    label = -1
    ignored = False
    if HAS_LABELS:
        label = tl.load(y_ptr + row)
        ignored = label == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, C, BLOCK)
    else:
        # Pass 1: softmax statistics at T (student, teacher), at T = 1 (CE), and E_p[z_p - z_q].
        m_s = tl.full([], neg_inf, ACC)
        l_s = tl.zeros([], ACC)
        m_t = tl.full([], neg_inf, ACC)
        l_t = tl.zeros([], ACC)
        m_1 = tl.full([], neg_inf, ACC)
        l_1 = tl.zeros([], ACC)
        w_kl = tl.zeros([], ACC)  # sum exp(z_p - m_p) (z_p - z_q), p = teacher (fwd) or student (rev)
        sum_x = tl.zeros([], ACC)
        for off in range(0, C, BLOCK):
            cols = off + cols0
            mask = cols < C
            xs = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
            if NEEDS_SOFT:
                xt = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)
                zs = xs * inv_t
                zt = xt * inv_t
                m_s, l_s, e_s, r_s = online_softmax(m_s, l_s, zs)
                m_t, l_t, e_t, r_t = online_softmax(m_t, l_t, zt)
                if DIV == 0:
                    w_kl = w_kl * r_t + tl.sum(tl.where(zt == neg_inf, 0.0, e_t * (zt - zs)), 0)
                elif DIV == 1:
                    w_kl = w_kl * r_s + tl.sum(tl.where(zs == neg_inf, 0.0, e_s * (zs - zt)), 0)
            if NEEDS_CE:
                m_1, l_1, _e1, _r1 = online_softmax(m_1, l_1, xs)
                if SMOOTH:
                    sum_x += tl.sum(tl.where(mask, xs, 0.0), 0)
        lse_s = lse(m_s, l_s)
        lse_t = lse(m_t, l_t)
        row_loss = tl.zeros([], ACC)
        k_s = tl.zeros([], ACC)  # the row constant of the reverse-KL / JSD gradient
        if NEEDS_SOFT:
            if DIV == 0:
                div = w_kl / l_t - lse_t + lse_s
            elif DIV == 1:
                div = w_kl / l_s - lse_s + lse_t
                k_s = div
            else:
                # Pass 2 (JSD): D and K_s = KL(p_s || m) need log m, hence both row constants.
                acc_div = tl.zeros([BLOCK], ACC)
                acc_ks = tl.zeros([BLOCK], ACC)
                for k in range(0, n_blocks):
                    cols = (n_blocks - 1 - k) * BLOCK + cols0  # backwards: see the module docstring
                    mask = cols < C
                    lps = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC) * inv_t - lse_s
                    lpt = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC) * inv_t - lse_t
                    lm = _log_mixture(lps, lpt, log_beta, log_1m_beta)
                    ks = _kl_term(lps, lm)
                    acc_ks += ks
                    acc_div += beta * _kl_term(lpt, lm) + (1.0 - beta) * ks
                div = tl.sum(acc_div, 0)
                k_s = tl.sum(acc_ks, 0)
            row_loss += soft_w * div
        lse_1 = lse(m_1, l_1)
        if NEEDS_CE:
            x_y = tl.load(s_row + label).to(ACC)
            ce = lse_1 - (1.0 - eps) * x_y
            if SMOOTH:
                ce -= eps / C * sum_x
            row_loss += alpha * ce
        tl.store(loss_ptr + row, row_loss)
        if COMPUTE_GRAD:
            # Last pass: d(row loss)/d(student) * grad_scale.
            gs = tl.load(gs_ptr).to(ACC)
            soft_scale = soft_gw * gs
            ce_scale = alpha * gs
            for k in range(0, n_blocks):
                # Against the direction of the previous pass, so that it starts on the columns
                # that pass read last, the likeliest to be still in L2.
                if DIV == 2:
                    cols = k * BLOCK + cols0
                else:
                    cols = (n_blocks - 1 - k) * BLOCK + cols0
                mask = cols < C
                xs = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
                d = tl.zeros([BLOCK], ACC)
                if NEEDS_SOFT:
                    xt = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)
                    lps = xs * inv_t - lse_s
                    lpt = xt * inv_t - lse_t
                    ps = tl.exp(lps)
                    if DIV == 0:
                        d = ps - tl.exp(lpt)
                    elif DIV == 1:
                        d = tl.where(ps == 0.0, 0.0, ps * (lps - lpt - k_s))
                    else:
                        lm = _log_mixture(lps, lpt, log_beta, log_1m_beta)
                        d = tl.where(ps == 0.0, 0.0, (1.0 - beta) * ps * (lps - lm - k_s))
                    d = d * soft_scale
                if NEEDS_CE:
                    q = tl.exp(xs - lse_1)
                    onehot = tl.where(cols == label, 1.0 - eps, 0.0)
                    d += ce_scale * (q - eps / C - onehot)
                tl.store(g_row + cols, d.to(g_ptr.dtype.element_ty), mask=mask)


def fused_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    label_smoothing: torch.Tensor,
    divergence: str,
    ignore_index: int,
    scale_by_t2: bool,
    reduction: str,
    num_items_in_batch: torch.Tensor | None,
    compute_grad: bool,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss as ``reduction`` asks, d(loss)/d(student) or an empty tensor): the contract of
    ``torch.ops.lepton_fast.fused_kd_loss`` (csrc/ops.cpp). ``block`` overrides the column
    block (a power of two), for tests."""
    op = "fused_kd_loss"
    if student_logits.dim() != 2 or student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
        raise ValueError(f"{op}: logits must be [N, C] with rows contiguous along C")
    if teacher_logits.shape != student_logits.shape or teacher_logits.dtype != student_logits.dtype:
        raise ValueError(f"{op}: student and teacher logits must have the same shape and dtype")
    t, b, a, eps = scalar(temperature), scalar(beta), scalar(alpha), scalar(label_smoothing)
    # beta 0 / 1 are forward / reverse KL exactly (csrc/kd_loss.h make_kd_params).
    div = _DIVERGENCES[divergence]
    if div == 2 and b in (0.0, 1.0):
        div = 0 if b == 0.0 else 1

    n_rows, n_classes = student_logits.shape
    acc, tl_acc = acc_dtype(student_logits)
    rows = torch.empty(n_rows, dtype=acc, device=student_logits.device)
    grad = (torch.empty_like(student_logits, memory_format=torch.contiguous_format) if compute_grad
            else student_logits.new_empty((0,)))
    divisor = max(n_rows, 1)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
        check_labels(op, labels, n_classes, ignore_index)
        divisor = (labels != ignore_index).sum().clamp(min=1)
    if num_items_in_batch is not None:
        divisor, reduction = num_items_in_batch, "mean"  # the sum over this count instead
    divides = reduction in ("mean", "batchmean")
    grad_scale = torch.as_tensor(divisor if divides else 1, dtype=torch.float64, device=student_logits.device)
    grad_scale = 1.0 / grad_scale
    if n_rows:
        if block is None:
            block = min(max(triton.next_power_of_2(n_classes), 16), MAX_BLOCK)
        scale = t * t if scale_by_t2 else 1.0
        log_beta = math.log(b) if b > 0 else -math.inf
        log_1m_beta = math.log1p(-b) if b < 1 else -math.inf
        _kd_loss_kernel[(n_rows,)](
            student_logits, teacher_logits, labels if labels is not None else rows, grad, rows, grad_scale,
            n_classes, student_logits.stride(0), teacher_logits.stride(0),
            1.0 / t, b, log_beta, log_1m_beta, a, eps, (1.0 - a) * scale, (1.0 - a) * scale / t, ignore_index,
            DIV=div, NEEDS_SOFT=a < 1, NEEDS_CE=a > 0, SMOOTH=eps > 0,
            HAS_LABELS=labels is not None, COMPUTE_GRAD=compute_grad, ACC=tl_acc, BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    check_rows_defined(op, rows, "student_logits or teacher_logits")
    return reduce_rows(rows, reduction, divisor), grad


def compile_targets():
    """Every variant fused_kd_loss above can launch, for tests/test_triton_aot.py, which
    compiles them ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Keep in step with fused_kd_loss: one entry per dtype, divergence (jsd with beta 0 or 1
    runs as DIV 0 or 1), alpha (0: soft only, (0, 1): both, 1: CE only), label smoothing,
    labels given, gradient wanted and column block (with its num_warps). Without labels the
    loss buffer stands in for y_ptr.
    """
    targets = []
    floats = ("inv_t", "beta", "log_beta", "log_1m_beta", "alpha", "eps", "soft_w", "soft_gw")
    blocks = [16 << i for i in range((MAX_BLOCK // 16).bit_length())]  # 16 .. MAX_BLOCK
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for div in _DIVERGENCES.values():
            for needs_soft, needs_ce in ((True, False), (True, True), (False, True)):
                for smooth in (False, True):
                    for has_labels in ((True,) if needs_ce else (False, True)):
                        for compute_grad in (False, True):
                            for block in blocks:
                                signature = {
                                    "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}",
                                    "y_ptr": "*i64" if has_labels else f"*{acc}", "g_ptr": f"*{dtype}",
                                    "loss_ptr": f"*{acc}", "gs_ptr": "*fp64",
                                    "C": "i32", "s_stride": "i32", "t_stride": "i32",
                                    **{name: "fp64" for name in floats}, "ignore_index": "i32",
                                }
                                constexprs = {
                                    "DIV": div, "NEEDS_SOFT": needs_soft, "NEEDS_CE": needs_ce, "SMOOTH": smooth,
                                    "HAS_LABELS": has_labels, "COMPUTE_GRAD": compute_grad,
                                    "ACC": tl.float64 if acc == "fp64" else tl.float32, "BLOCK": block,
                                }
                                signature.update({name: "constexpr" for name in constexprs})
                                options = {"num_warps": 8 if block >= 2048 else 4}
                                targets.append((_kd_loss_kernel, signature, constexprs, options))
    return targets
