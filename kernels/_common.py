"""What the Triton kernels share: the online-softmax and log-sum-exp helpers (device code),
and the host-side work of a launcher that the C++ kernels do in C++ (reading the 0-d
hyper-parameter tensors, the reduction). The data checks (labels, indices, undefined rows)
are lepton_fast._validate's, which the reference kernels make too, in the C++ kernels' words.

Scalars: every floating scalar argument of a ``@triton.jit`` kernel is annotated
``tl.float64`` (Triton would otherwise pass a Python float as float32, and a float64 input
would lose digits) and converted once, inside the kernel, to the accumulation type ACC.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def online_softmax(m, s, x, scale):
    """Fold a block x of raw logits into the running statistics of softmax(x * scale), scale =
    1 / T > 0: the max m of x and the sum s of exp((x - m) * scale); an all -inf block leaves
    them be. Returns (new max, new sum, exp((x - new max) * scale), the factor
    exp((m - new max) * scale)). The max is subtracted before the scaling, so the exponent is
    exactly 0 at the max whatever T (x * scale - max(x * scale) would subtract rounded
    products: at T = 1e-8 an error of 4 in the exponent, 512 at T = 1e-10)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp((x - safe) * scale)
    factor = tl.exp((m - safe) * scale)
    return m_new, s * factor + tl.sum(e, 0), e, factor


@triton.jit
def lse(m, s):
    """log-sum-exp from a row's (max, sum); NaN for a row with no finite entry, which the
    launcher turns into an error."""
    return tl.where(m == float("-inf"), float("nan"), m + tl.log(s))


@triton.jit
def store_zeros(ptr, n, BLOCK: tl.constexpr):
    """ptr[0:n] = 0, in blocks of BLOCK: the gradient of a row left out of the loss."""
    cols0 = tl.arange(0, BLOCK)
    for off in range(0, n, BLOCK):
        cols = off + cols0
        tl.store(ptr + cols, tl.zeros([BLOCK], ptr.dtype.element_ty), mask=cols < n)


def scalar(t: torch.Tensor) -> float:
    """The value of a 0-d hyper-parameter tensor (float64 on the CPU: no device sync)."""
    return float(t)


def signature(kernel, pointers: dict, other_pointers: str) -> dict:
    """The signature Triton derives from a launch of ``kernel``, for compile_targets(): a
    ``*_ptr`` parameter's type from ``pointers`` (``{"s_ptr": "*bf16"}``), else
    ``other_pointers``; a scalar annotated ``tl.float64`` is fp64, any other an i32; a
    constexpr parameter "constexpr"."""
    return {p.name: "constexpr" if p.is_constexpr
            else pointers.get(p.name, other_pointers) if p.name.endswith("_ptr")
            else p.annotation or "i32"
            for p in kernel.params}


def acc_dtype(x: torch.Tensor):
    """(torch, triton) accumulation dtypes of logits ``x``: float64 for float64, else float32."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def reduce_rows(rows: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    """"none": rows; "sum": their sum; else their sum / divisor (a number or a 0-d tensor)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else (total / divisor).to(rows.dtype)
