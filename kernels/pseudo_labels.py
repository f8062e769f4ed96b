"""Triton kernels of select_pseudo_labels and fused_pseudo_label_loss.

Same signatures and outputs as the C++ ops (schemas in csrc/ops.cpp); the row math is the
one in csrc/pseudo_labels.h. One program per row: pass 1 streams both views in blocks of
columns, keeping online softmax statistics (and the weak view's arg-max); pass 2 writes the
gradient (and sums the soft target's dot product).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_rows_defined, reduce_rows, scalar

_MAX_BLOCK = 4096


@triton.jit
def _online(m, s, x):
    """Merge a block x into running (max m, sum of exp(. - m)); -inf blocks leave them be."""
    m_new = tl.maximum(m, tl.max(x, 0))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - base) + tl.sum(tl.exp(x - base), 0)


@triton.jit
def _pseudo_label_kernel(
    strong_ptr, weak_ptr, thresholds_ptr, weights_ptr, grad_ptr,
    rows_ptr, labels_ptr, confidence_ptr, mask_ptr,
    n_classes, strong_stride, weak_stride,
    threshold, inv_temperature, grad_scale,
    ACC: tl.constexpr, LOSS: tl.constexpr, SOFT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_THRESHOLDS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    w_row = weak_ptr + row * weak_stride
    s_row = strong_ptr + row * strong_stride
    neg_inf = float("-inf")
    w_max = tl.full((), neg_inf, ACC)
    w_sum = tl.zeros((), ACC)
    s_max = tl.full((), neg_inf, ACC)
    s_sum = tl.zeros((), ACC)
    label = tl.zeros((), tl.int64)
    for start in range(0, n_classes, BLOCK):
        j = start + cols
        inside = j < n_classes
        z = tl.load(w_row + j, mask=inside, other=neg_inf).to(ACC) * inv_temperature
        block_max = tl.max(z, 0)
        # Blocks come in column order and tl.argmax keeps the first maximum: ties -> lowest index.
        label = tl.where(block_max > w_max, start + tl.argmax(z, 0).to(tl.int64), label)
        w_max, w_sum = _online(w_max, w_sum, z)
        if LOSS:
            x = tl.load(s_row + j, mask=inside, other=neg_inf).to(ACC)
            s_max, s_sum = _online(s_max, s_sum, x)
    confidence = tl.where(w_max == neg_inf, float("nan"), 1.0 / w_sum)
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
        keep = weight != 0
        lse_s = s_max + tl.log(s_sum)
        lse_w = w_max + tl.log(w_sum)
        gw = weight * grad_scale
        dot = tl.zeros((), ACC)
        if SOFT or COMPUTE_GRAD:
            for start in range(0, n_classes, BLOCK):
                j = start + cols
                inside = j < n_classes
                x = tl.load(s_row + j, mask=inside, other=0.0).to(ACC)
                if SOFT:
                    z = tl.load(w_row + j, mask=inside, other=neg_inf).to(ACC) * inv_temperature
                    target = tl.exp(z - lse_w)
                    dot += tl.sum(tl.where(target == 0, 0.0, target * x), 0)
                else:
                    target = (j == label).to(ACC)
                if COMPUTE_GRAD:
                    g = tl.where(keep, gw * (tl.exp(x - lse_s) - target), 0.0)
                    g = g.to(grad_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
                    tl.store(grad_ptr + row * n_classes + j, g, mask=inside)
        if not SOFT:
            dot = tl.load(s_row + label).to(ACC)
        tl.store(rows_ptr + row, tl.where(keep, weight * (lse_s - dot), 0.0))


def _launch(strong, weak, class_thresholds, weights, threshold, temperature, soft, grad_scale, compute_grad, loss):
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_rows, n_classes = weak.shape
    acc = torch.promote_types(weak.dtype, torch.float32)
    labels = weak.new_empty((n_rows,), dtype=torch.int64)
    confidence = weak.new_empty((n_rows,), dtype=acc)
    mask = weak.new_empty((n_rows,), dtype=torch.bool)
    rows = weak.new_empty((n_rows,), dtype=acc) if loss else confidence
    grad = torch.empty_like(strong) if compute_grad else weak.new_empty((0,))
    if class_thresholds is not None:
        class_thresholds = class_thresholds.to(torch.float32).contiguous()
    if weights is not None:
        weights = weights.to(acc).contiguous()
    if n_rows:
        block = min(triton.next_power_of_2(n_classes), _MAX_BLOCK)
        _pseudo_label_kernel[(n_rows,)](
            strong, weak, class_thresholds, weights, grad, rows, labels, confidence, mask,
            n_classes, strong.stride(0), weak.stride(0),
            float(threshold), 1.0 / temperature, float(grad_scale),
            ACC=tl.float64 if acc == torch.float64 else tl.float32, LOSS=loss, SOFT=bool(soft),
            COMPUTE_GRAD=bool(compute_grad and loss), HAS_THRESHOLDS=class_thresholds is not None,
            HAS_WEIGHTS=weights is not None, BLOCK=block,
        )
    return rows, grad, labels, confidence, mask


def select_pseudo_labels(logits, threshold, temperature, class_thresholds):
    """The contract of torch.ops.lepton_fast.select_pseudo_labels (csrc/ops.cpp)."""
    _, _, labels, confidence, mask = _launch(
        logits, logits, class_thresholds, None, scalar(threshold), scalar(temperature), False, 1.0, False, loss=False
    )
    check_rows_defined("select_pseudo_labels", confidence, "logits")
    return labels, confidence, mask


def fused_pseudo_label_loss(strong_logits, weak_logits, threshold, temperature, soft, class_thresholds, weights,
                            reduction, compute_grad):
    """The contract of torch.ops.lepton_fast.fused_pseudo_label_loss (csrc/ops.cpp)."""
    if strong_logits.shape != weak_logits.shape or strong_logits.dtype != weak_logits.dtype:
        raise ValueError("fused_pseudo_label_loss: strong and weak logits must have the same shape and dtype")
    n_rows, n_classes = strong_logits.shape
    divisor = max(n_rows, 1)
    grad_scale = 1.0 / divisor if reduction in ("mean", "batchmean") else 1.0
    rows, grad, labels, confidence, mask = _launch(
        strong_logits, weak_logits, class_thresholds, weights, scalar(threshold), scalar(temperature), soft,
        grad_scale, compute_grad, loss=True,
    )
    check_rows_defined("fused_pseudo_label_loss", confidence, "weak_logits")
    check_rows_defined("fused_pseudo_label_loss", rows, "strong_logits")
    counts = torch.zeros(n_classes, dtype=torch.int64, device=strong_logits.device)
    counts.index_add_(0, labels, mask.to(torch.int64))
    return reduce_rows(rows, reduction, divisor), grad, labels, confidence, mask, counts


def compile_targets():
    """Every variant _launch above can pick, for tests/test_triton_aot.py, which compiles them
    ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Keep in step with _launch: one entry per dtype, op (select: LOSS False; loss: soft or
    hard targets, gradient wanted, weights given), per-class thresholds given, and column
    block. Absent tensors arrive as None (a constexpr); select passes confidence as rows.
    BLOCK 1 means one class, where Triton makes the class count and strides the constant 1.
    """
    targets = []
    blocks = [1 << i for i in range(_MAX_BLOCK.bit_length())]  # 1 .. _MAX_BLOCK
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        variants = [(False, False, False, False)]  # select: (LOSS, SOFT, COMPUTE_GRAD, HAS_WEIGHTS)
        variants += [(True, soft, grad, weights) for soft in (False, True) for grad in (False, True)
                     for weights in (False, True)]
        for loss, soft, compute_grad, has_weights in variants:
            for has_thresholds in (False, True):
                for block in blocks:
                    one_class = block == 1
                    signature = {
                        "strong_ptr": f"*{dtype}", "weak_ptr": f"*{dtype}",
                        "thresholds_ptr": "*fp32" if has_thresholds else "constexpr",
                        "weights_ptr": f"*{acc}" if has_weights else "constexpr",
                        "grad_ptr": f"*{dtype}", "rows_ptr": f"*{acc}", "labels_ptr": "*i64",
                        "confidence_ptr": f"*{acc}", "mask_ptr": "*u1",
                        "n_classes": "constexpr" if one_class else "i32",
                        "strong_stride": "constexpr" if one_class else "i32",
                        "weak_stride": "constexpr" if one_class else "i32",
                        "threshold": "fp32", "inv_temperature": "fp32", "grad_scale": "fp32",
                    }
                    constexprs = {
                        "ACC": tl.float64 if acc == "fp64" else tl.float32, "LOSS": loss, "SOFT": soft,
                        "COMPUTE_GRAD": compute_grad, "HAS_THRESHOLDS": has_thresholds,
                        "HAS_WEIGHTS": has_weights, "BLOCK": block,
                    }
                    signature.update({name: "constexpr" for name in constexprs})
                    if not has_thresholds:
                        constexprs["thresholds_ptr"] = None
                    if not has_weights:
                        constexprs["weights_ptr"] = None
                    if one_class:
                        constexprs.update(n_classes=1, strong_stride=1, weak_stride=1)
                    targets.append((_pseudo_label_kernel, signature, constexprs, {"num_warps": 4}))
    return targets
