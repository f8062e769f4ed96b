"""Triton kernels of fgsm_perturb and pgd_step and their in-place forms (schemas: csrc/ops.cpp).

One elementwise kernel serves both steps (IS_PGD); each program handles BLOCK consecutive
elements of the flat contiguous buffers, in float32 (float64 for float64 inputs), rounded
once at the store. The math and its order are those of csrc/adversarial.h, so float32
results are bit-identical to the eager torch composition. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _sign(g):
    return (g > 0).to(tl.float32) - (g < 0).to(tl.float32)


@triton.jit
def _clamp_keep(v, lo, hi):
    # As torch.clamp: a value equal to a bound is kept, NaN compares false and is kept.
    v = tl.where(v < lo, lo, v)
    return tl.where(hi < v, hi, v)


@triton.jit
def _step_kernel(
    x_ptr, orig_ptr, g_ptr, out_ptr, numel, inner,
    step, eps, lo, hi, step_ps_ptr, eps_ps_ptr, params_ptr,
    IS_PGD: tl.constexpr, STEP_PS: tl.constexpr, EPS_PS: tl.constexpr, CLAMP: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < numel
    x = tl.load(x_ptr + offs, mask=live)
    if not IS_F64:
        x = x.to(tl.float32)
    if IS_F64:  # Triton passes float arguments as float32: float64 scalars come from memory
        step = tl.load(params_ptr + 0)
        eps = tl.load(params_ptr + 1)
        lo = tl.load(params_ptr + 2)
        hi = tl.load(params_ptr + 3)
    sample = offs // inner
    if STEP_PS:
        step = tl.load(step_ps_ptr + sample, mask=live)
    # sign is 0 or +-1, exact in any dtype; the product promotes to x's compute dtype
    out = x + step * _sign(tl.load(g_ptr + offs, mask=live))
    if IS_PGD:
        if EPS_PS:
            eps = tl.load(eps_ps_ptr + sample, mask=live)
        orig = tl.load(orig_ptr + offs, mask=live)
        if not IS_F64:
            orig = orig.to(tl.float32)
        out = orig + _clamp_keep(out - orig, -eps, eps)
    if CLAMP:
        out = _clamp_keep(out, lo, hi)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live)


def _size(v, out):
    """(value, per-sample tensor or None) of a step size or radius tensor (see csrc/ops.cpp)."""
    if v.numel() == 1 and v.device.type == "cpu":
        return float(v), None
    return 0.0, v.reshape(-1).contiguous()


def _launch(x, orig, grad, step, eps, clamp_min, clamp_max, out, is_pgd):
    for t in (x, orig, grad):
        if t.shape != out.shape or t.dtype != out.dtype or not t.is_contiguous():
            raise RuntimeError("every input must be contiguous with the shape and dtype of out")
    if not out.is_contiguous():
        raise RuntimeError("out must be contiguous")
    if (clamp_min is None) != (clamp_max is None):
        raise RuntimeError("clamp_min and clamp_max must both be given or both be None")
    numel = out.numel()
    if numel == 0:
        return
    step, step_ps = _size(step, out)
    eps, eps_ps = _size(eps, out)
    n = out.shape[0] if out.dim() > 0 else 1
    per_sample = step_ps is not None or eps_ps is not None
    inner = numel // n if per_sample and n > 0 else numel
    clamp = clamp_min is not None
    lo, hi = (float(clamp_min), float(clamp_max)) if clamp else (0.0, 0.0)
    is_f64 = out.dtype == torch.float64
    # float64 only (rare): its scalars travel in a small tensor, one host-to-device copy
    params = torch.tensor([step, eps, lo, hi], dtype=torch.float64, device=out.device) if is_f64 else out
    _step_kernel[(triton.cdiv(numel, BLOCK),)](
        x, orig, grad, out, numel, inner, step, eps, lo, hi,
        step_ps if step_ps is not None else out, eps_ps if eps_ps is not None else out, params,
        IS_PGD=is_pgd, STEP_PS=step_ps is not None, EPS_PS=eps_ps is not None, CLAMP=clamp,
        IS_F64=is_f64, BLOCK=BLOCK,
    )


def fgsm_perturb(x, grad, eps, clamp_min, clamp_max):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, x, grad, eps, torch.zeros((), dtype=torch.float64), clamp_min, clamp_max, out, is_pgd=False)
    return out


def fgsm_perturb_(x, grad, eps, clamp_min, clamp_max) -> None:
    _launch(x, x, grad, eps, torch.zeros((), dtype=torch.float64), clamp_min, clamp_max, x, is_pgd=False)


def pgd_step(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
    out = torch.empty_like(x_adv, memory_format=torch.contiguous_format)
    _launch(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max, out, is_pgd=True)
    return out


def pgd_step_(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max) -> None:
    _launch(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max, x_adv, is_pgd=True)


def compile_targets():
    """Every variant _launch above can pick, for tests/test_triton_aot.py, which compiles them
    ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Keep in step with _launch: one entry per dtype, step (FGSM or PGD), per-sample step and
    eps, clamp, and index width (numel past 2^31 - 1 arrives as i64). A per-sample tensor is
    in the compute dtype; an absent one is replaced by ``out``, as is ``params`` below float64.
    """
    targets = []
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for is_pgd in (False, True):
            for step_ps in (False, True):
                for eps_ps in ((False, True) if is_pgd else (False,)):
                    for clamp in (False, True):
                        for numel in ("i32", "i64"):
                            signature = {
                                "x_ptr": f"*{dtype}", "orig_ptr": f"*{dtype}", "g_ptr": f"*{dtype}",
                                "out_ptr": f"*{dtype}", "numel": numel,
                                "inner": "i32" if step_ps or eps_ps else numel,
                                "step": "fp32", "eps": "fp32", "lo": "fp32", "hi": "fp32",
                                "step_ps_ptr": f"*{acc if step_ps else dtype}",
                                "eps_ps_ptr": f"*{acc if eps_ps else dtype}",
                                "params_ptr": f"*{dtype}",
                            }
                            constexprs = {"IS_PGD": is_pgd, "STEP_PS": step_ps, "EPS_PS": eps_ps, "CLAMP": clamp,
                                          "IS_F64": dtype == "fp64", "BLOCK": BLOCK}
                            signature.update({name: "constexpr" for name in constexprs})
                            targets.append((_step_kernel, signature, constexprs, {"num_warps": 4}))
    return targets
