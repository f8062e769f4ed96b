"""Triton kernels of select_pseudo_labels and fused_pseudo_label_loss (schemas: lepton_fast/ops/pseudo_labels.py),
the same contract as the C++ kernels.

One program per row walks the row in column blocks, so a row of any width runs in a fixed
number of registers:
  pass 1 reads the weak view: online softmax statistics of z = w / T (the max of w, and
    exponents (w - max) / T, exact at the max for every T in 1e-8 ... 1e4) and its arg-max
    (labels, confidence, mask). A row of weight 0 stops there: loss 0, gradient 0, and its
    strong view is never read (it may hold anything).
  pass 2 reads the strong view: its softmax statistics and, for the soft target
    q = softmax(z), sum_j q_j s_j (the weak view re-read); the row's loss.
  pass 3 writes the gradient times weight * grad_scale, walking the row backwards, so that it
    starts on the columns pass 2 read last, the likeliest to be still in L2.
Accumulation is float32 (float64 for float64 inputs). Per-row losses are written, never
atomically added, so the reduction is deterministic. The row math is csrc/pseudo_labels.h.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lepton_fast._validate import rows_defined

from ._common import acc_dtype, lse, online_softmax, reduce_rows, scalar, store_zeros

# Widest column block: two views and their exps per element stay in registers at 8 warps.
MAX_BLOCK = 4096


@triton.jit
def _pseudo_label_kernel(
    strong_ptr, weak_ptr, thresholds_ptr, weights_ptr, grad_ptr,
    loss_ptr, labels_ptr, confidence_ptr, mask_ptr,
    C, strong_stride, weak_stride,
    # Float scalars arrive as float64 so that float64 inputs keep full precision.
    threshold: tl.float64, inv_t: tl.float64, grad_scale: tl.float64,
    LOSS: tl.constexpr, SOFT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_THRESHOLDS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    threshold = tl.full([], threshold, ACC)
    inv_t = tl.full([], inv_t, ACC)
    grad_scale = tl.full([], grad_scale, ACC)
    row = tl.program_id(0).to(tl.int64)
    w_row = weak_ptr + row * weak_stride
    cols0 = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    # Pass 1: the weak view.
    m_w = tl.full([], neg_inf, ACC)
    l_w = tl.zeros([], ACC)
    label = tl.zeros([], tl.int64)
    for off in range(0, C, BLOCK):
        cols = off + cols0
        x = tl.load(w_row + cols, mask=cols < C, other=neg_inf).to(ACC)
        # The arg-max of w as given (that of w / T, and the one a float64 reference finds where
        # rounding makes two w / T equal). Blocks come in column order and tl.argmax keeps the
        # first maximum: ties -> lowest index.
        # m_w, the running max of softmax's statistics, is w's own.
        label = tl.where(tl.max(x, 0) > m_w, off + tl.argmax(x, 0).to(tl.int64), label)
        m_w, l_w, _e, _f = online_softmax(m_w, l_w, x, inv_t)
    # log q = (w - m_w) / T - log l_w: the max is the raw logits', subtracted before the scaling.
    log_l_w = tl.where(m_w == neg_inf, float("nan"), tl.log(l_w))
    confidence = tl.where(m_w == neg_inf, float("nan"), 1.0 / l_w)
    if HAS_THRESHOLDS:
        cut = tl.load(thresholds_ptr + label).to(ACC)
    else:
        cut = threshold
    selected = confidence >= cut
    tl.store(labels_ptr + row, label)
    tl.store(confidence_ptr + row, confidence)
    tl.store(mask_ptr + row, selected)

    if LOSS:
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + row).to(ACC)
        else:
            weight = selected.to(ACC)
        s_row = strong_ptr + row * strong_stride
        g_row = grad_ptr + row * C
        if weight == 0:
            tl.store(loss_ptr + row, tl.zeros([], ACC))
            if COMPUTE_GRAD:
                store_zeros(g_row, C, BLOCK)
        else:
            # Pass 2: the strong view.
            m_s = tl.full([], neg_inf, ACC)
            l_s = tl.zeros([], ACC)
            dot = tl.zeros([], ACC)
            for off in range(0, C, BLOCK):
                cols = off + cols0
                inside = cols < C
                x = tl.load(s_row + cols, mask=inside, other=neg_inf).to(ACC)
                m_s, l_s, _e, _f = online_softmax(m_s, l_s, x, 1.0)
                if SOFT:
                    q = tl.exp((tl.load(w_row + cols, mask=inside, other=neg_inf).to(ACC) - m_w) * inv_t - log_l_w)
                    dot += tl.sum(tl.where(q == 0.0, 0.0, q * x), 0)  # 0 * -inf = 0: a class q rules out
            if not SOFT:
                dot = tl.load(s_row + label).to(ACC)
            lse_s = lse(m_s, l_s)
            tl.store(loss_ptr + row, weight * (lse_s - dot))
            if COMPUTE_GRAD:
                # Pass 3: d(row loss)/d(strong) * grad_scale.
                gw = weight * grad_scale
                n_blocks = tl.cdiv(C, BLOCK)
                for k in range(0, n_blocks):
                    cols = (n_blocks - 1 - k) * BLOCK + cols0
                    inside = cols < C
                    p = tl.exp(tl.load(s_row + cols, mask=inside, other=neg_inf).to(ACC) - lse_s)
                    if SOFT:
                        w = tl.load(w_row + cols, mask=inside, other=neg_inf).to(ACC)
                        target = tl.exp((w - m_w) * inv_t - log_l_w)
                    else:
                        target = (cols == label).to(ACC)
                    g = (gw * (p - target)).to(grad_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
                    tl.store(g_row + cols, g, mask=inside)


def _launch(strong, weak, threshold, temperature, soft, class_thresholds, weights, grad_scale, compute_grad,
            block):
    """Runs the kernel on [N, C] rows (``strong`` None: select only) and returns (per-row loss
    or None, gradient or an empty tensor, labels, confidence, mask)."""
    if weak.dim() != 2 or weak.stride(1) != 1 or (strong is not None and strong.stride(1) != 1):
        raise ValueError("pseudo-labels: logits must be [N, C] with rows contiguous along C")
    n_rows, n_classes = weak.shape
    acc, tl_acc = acc_dtype(weak)
    labels = weak.new_empty((n_rows,), dtype=torch.int64)
    confidence = weak.new_empty((n_rows,), dtype=acc)
    mask = weak.new_empty((n_rows,), dtype=torch.bool)
    rows = weak.new_empty((n_rows,), dtype=acc) if strong is not None else None
    grad = (torch.empty_like(strong, memory_format=torch.contiguous_format) if compute_grad
            else weak.new_empty((0,)))
    if class_thresholds is not None:
        class_thresholds = class_thresholds.to(acc).contiguous()
    if weights is not None:
        weights = weights.to(acc).contiguous()
    if n_rows:
        if block is None:
            block = min(max(triton.next_power_of_2(n_classes), 16), MAX_BLOCK)
        # select (LOSS False) never reads strong_ptr nor writes loss_ptr: any tensor of the
        # right type stands in for them.
        strong_or_weak = strong if strong is not None else weak
        _pseudo_label_kernel[(n_rows,)](
            strong_or_weak, weak, class_thresholds, weights, grad,
            rows if rows is not None else confidence, labels, confidence, mask,
            n_classes, strong_or_weak.stride(0), weak.stride(0),
            scalar(threshold), 1.0 / scalar(temperature), grad_scale,
            LOSS=strong is not None, SOFT=bool(soft), COMPUTE_GRAD=bool(compute_grad),
            HAS_THRESHOLDS=class_thresholds is not None, HAS_WEIGHTS=weights is not None, ACC=tl_acc, BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return rows, grad, labels, confidence, mask


def select_pseudo_labels(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    temperature: torch.Tensor,
    class_thresholds: torch.Tensor | None,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, confidence, mask): the contract of ``torch.ops.lepton_fast.select_pseudo_labels``
    (lepton_fast/ops/pseudo_labels.py). ``block`` overrides the column block (a power of two), for tests."""
    _, _, labels, confidence, mask = _launch(None, logits, threshold, temperature, False, class_thresholds, None,
                                             1.0, False, block)
    rows_defined("select_pseudo_labels", confidence, "logits")
    return labels, confidence, mask


def fused_pseudo_label_loss(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    threshold: torch.Tensor,
    temperature: torch.Tensor,
    soft: bool,
    class_thresholds: torch.Tensor | None,
    weights: torch.Tensor | None,
    reduction: str,
    compute_grad: bool,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss as ``reduction`` asks, d(loss)/d(strong) or an empty tensor, labels, confidence,
    mask, class_counts): the contract of ``torch.ops.lepton_fast.fused_pseudo_label_loss``
    (lepton_fast/ops/pseudo_labels.py). ``block`` overrides the column block (a power of two), for tests."""
    op = "fused_pseudo_label_loss"
    if strong_logits.shape != weak_logits.shape or strong_logits.dtype != weak_logits.dtype:
        raise ValueError(f"{op}: strong_logits and weak_logits must have the same shape and dtype")
    n_rows, n_classes = strong_logits.shape
    # "mean" divides by every row, selected or not (FixMatch); its 1/N scales the gradient.
    divisor = max(n_rows, 1)
    grad_scale = 1.0 / divisor if reduction in ("mean", "batchmean") else 1.0
    rows, grad, labels, confidence, mask = _launch(strong_logits, weak_logits, threshold, temperature, soft,
                                                   class_thresholds, weights, grad_scale, compute_grad, block)
    rows_defined(op, confidence, "weak_logits")
    rows_defined(op, rows, "strong_logits")
    counts = torch.zeros(n_classes, dtype=torch.int64, device=strong_logits.device)
    counts.index_add_(0, labels, mask.to(torch.int64))
    return reduce_rows(rows, reduction, divisor), grad, labels, confidence, mask, counts


def compile_targets():
    """Every variant _launch above can pick, for tests/test_triton_aot.py, which compiles them
    ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Keep in step with _launch: one entry per dtype, op (select: LOSS False; loss: soft or
    hard targets, gradient wanted, weights given), per-class thresholds given, and column
    block (with its num_warps). Absent tensors arrive as None (a constexpr); select passes
    confidence as the loss buffer and the weak view as the strong one. One class (C = 1, the
    smallest block) is a variant of its own: Triton makes the class count and the strides the
    constant 1 there.
    """
    targets = []
    blocks = [16 << i for i in range((MAX_BLOCK // 16).bit_length())]  # 16 .. MAX_BLOCK
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        variants = [(False, False, False, False)]  # select: (LOSS, SOFT, COMPUTE_GRAD, HAS_WEIGHTS)
        variants += [(True, soft, grad, weights) for soft in (False, True) for grad in (False, True)
                     for weights in (False, True)]
        for loss, soft, compute_grad, has_weights in variants:
            for has_thresholds in (False, True):
                for block, one_class in [(b, False) for b in blocks] + [(blocks[0], True)]:
                    signature = {
                        "strong_ptr": f"*{dtype}", "weak_ptr": f"*{dtype}",
                        "thresholds_ptr": f"*{acc}" if has_thresholds else "constexpr",
                        "weights_ptr": f"*{acc}" if has_weights else "constexpr",
                        "grad_ptr": f"*{dtype}", "loss_ptr": f"*{acc}", "labels_ptr": "*i64",
                        "confidence_ptr": f"*{acc}", "mask_ptr": "*u1",
                        "C": "constexpr" if one_class else "i32",
                        "strong_stride": "constexpr" if one_class else "i32",
                        "weak_stride": "constexpr" if one_class else "i32",
                        "threshold": "fp64", "inv_t": "fp64", "grad_scale": "fp64",
                    }
                    constexprs = {
                        "LOSS": loss, "SOFT": soft, "COMPUTE_GRAD": compute_grad, "HAS_THRESHOLDS": has_thresholds,
                        "HAS_WEIGHTS": has_weights, "ACC": tl.float64 if acc == "fp64" else tl.float32,
                        "BLOCK": block,
                    }
                    signature.update({name: "constexpr" for name in constexprs})
                    if not has_thresholds:
                        constexprs["thresholds_ptr"] = None
                    if not has_weights:
                        constexprs["weights_ptr"] = None
                    if one_class:
                        constexprs.update(C=1, strong_stride=1, weak_stride=1)
                    options = {"num_warps": 8 if block >= 2048 else 4}
                    targets.append((_pseudo_label_kernel, signature, constexprs, options))
    return targets
