"""Triton kernel of scale_grad_, the fused losses' backward: grad *= scale in place (schema: lepton_fast/ops/scale_grad.py).

``scale`` is 0-d (the grad_output of a "mean"/"sum" loss) or [N] (of "none"), one factor
per row of the [N, C] gradient. Every program reads a 0-d scale itself and does nothing
when it is exactly 1, so the usual ``loss.backward()`` costs one tiny launch and no pass over
the gradient, without the host ever reading the value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _scale_grad_kernel(g_ptr, scale_ptr, numel, C, PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if PER_ROW:
        scale = tl.load(scale_ptr + offs // C, mask=mask, other=1.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask).to(ACC)
        tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)
    else:
        scale = tl.load(scale_ptr).to(ACC)
        if scale != 1.0:
            g = tl.load(g_ptr + offs, mask=mask).to(ACC)
            tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place. grad: contiguous [N, C]; scale: 0-d, or [N] for one factor per row.

    The product is formed in float32 (float64 for a float64 gradient) and rounded once.
    Raises ValueError for a non-contiguous grad or a scale of another shape.
    """
    if not grad.is_contiguous():
        raise ValueError("scale_grad_: grad must be contiguous")
    per_row = scale.dim() != 0
    if per_row and (grad.dim() != 2 or scale.numel() != grad.shape[0]):
        raise ValueError(f"scale_grad_: scale must be 0-d or [N] for an [N, C] grad, got {tuple(scale.shape)}")
    if grad.numel() == 0:
        return
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    scale = scale.to(device=grad.device, dtype=acc).contiguous()
    n_classes = grad.shape[-1] if grad.dim() else 1
    _scale_grad_kernel[(triton.cdiv(grad.numel(), BLOCK),)](
        grad, scale, grad.numel(), n_classes, PER_ROW=per_row,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=BLOCK, num_warps=8,
    )


def compile_targets():
    """Every variant scale_grad_ above can launch, for tests/test_triton_aot.py, which compiles
    them ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Keep in step with scale_grad_: one entry per gradient dtype, scale shape (PER_ROW) and
    index width (numel past 2^31 - 1 arrives as i64).
    """
    targets = []
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for per_row in (False, True):
            for numel in ("i32", "i64"):
                signature = {"g_ptr": f"*{dtype}", "scale_ptr": f"*{acc}", "numel": numel, "C": "i32",
                             "PER_ROW": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"}
                constexprs = {"PER_ROW": per_row, "ACC": tl.float64 if acc == "fp64" else tl.float32, "BLOCK": BLOCK}
                targets.append((_scale_grad_kernel, signature, constexprs, {"num_warps": 8}))
    return targets
