"""Triton kernels of fgsm_perturb and pgd_step and their in-place forms (schemas: lepton_fast/ops/adversarial.py).

One elementwise kernel serves both steps (IS_PGD); each program handles BLOCK consecutive
elements of the flat contiguous buffers, in float32 (float64 for float64 inputs), rounded
once at the store. The math and its order are those of csrc/adversarial.h, so float32
results are bit-identical to the eager torch composition. Offsets are int64.

Operands (eps, step_size, clamp bounds) are described as csrc/adversarial.h describes them: a
0-d CPU tensor is a float64 scalar argument, any other tensor that broadcasts to x is read as
data[(i // run) % period], expanded to x's shape first where its broadcast has no such form.
The faults of csrc/adversarial.h (the input farther than eps outside the clamp box, a step that
is not finite in x's dtype) set bits of a flag word that the launcher checks: at once on CPU
tensors (the interpreter), with torch._assert_async on a GPU, so nothing synchronises.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import acc_dtype

BLOCK = 2048
_OUTSIDE_BOX, _OVERFLOW = 1, 2
_FIX = ("If the input is a normalised image ((image - mean) / std), its box is ((0 - mean) / std, (1 - mean) / std) "
        "per channel: pass clamp=(lo, hi) with tensors of shape [C, 1, 1], or clamp=None for inputs without bounds.")
# The largest float32 (float64) value that rounds to a finite value of each dtype, as
# csrc/adversarial.h's finite_limit: just below max + half an ulp for the 16-bit types.
_LIMITS = {
    torch.float16: 65519.99609375,
    torch.bfloat16: 2.0**128 - 2.0**119 - 2.0**104,
    torch.float32: torch.finfo(torch.float32).max,
    torch.float64: torch.finfo(torch.float64).max,
}


@triton.jit
def _clamp_keep(v, lo, hi):
    # As torch.clamp: a value equal to a bound is kept, NaN compares false and is kept.
    v = tl.where(v < lo, lo, v)
    return tl.where(hi < v, hi, v)


@triton.jit
def _operand(ptr, value, run, period, offs, live, IS_TENSOR: tl.constexpr, ACC: tl.constexpr):
    # One return of one type: Triton's compiler types every return of a function, constexpr
    # branches included, so a 0-d scalar here and a block there do not compile.
    if IS_TENSOR:
        v = tl.load(ptr + (offs // run) % period, mask=live, other=0.0).to(ACC)
    else:
        v = tl.full(offs.shape, value, ACC)
    return v


@triton.jit
def _step_kernel(
    x_ptr, orig_ptr, g_ptr, out_ptr, flags_ptr, numel,
    step_ptr, step: tl.float64, step_run, step_period,
    eps_ptr, eps: tl.float64, eps_run, eps_period,
    lo_ptr, lo: tl.float64, lo_run, lo_period,
    hi_ptr, hi: tl.float64, hi_run, hi_period,
    limit: tl.float64,
    IS_PGD: tl.constexpr, CLAMP: tl.constexpr, STEP_T: tl.constexpr, EPS_T: tl.constexpr, LO_T: tl.constexpr,
    HI_T: tl.constexpr, ACC: tl.constexpr, FINITE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < numel
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=live, other=0.0)
    s = _operand(step_ptr, step, step_run, step_period, offs, live, STEP_T, ACC)
    # sign is 0 or +-1, exact in any dtype, so s * sign is exact and an FMA changes no bit
    out = x + s * ((g > 0).to(ACC) - (g < 0).to(ACC))
    if IS_PGD:
        radius = _operand(eps_ptr, eps, eps_run, eps_period, offs, live, EPS_T, ACC)
        inp = tl.load(orig_ptr + offs, mask=live, other=0.0).to(ACC)
        out = inp + _clamp_keep(out - inp, -radius, radius)
    else:
        radius = s
        inp = x
    faults = 0
    if CLAMP:
        lo_v = _operand(lo_ptr, lo, lo_run, lo_period, offs, live, LO_T, ACC)
        hi_v = _operand(hi_ptr, hi, hi_run, hi_period, offs, live, HI_T, ACC)
        out = _clamp_keep(out, lo_v, hi_v)
        outside = ((inp + radius < lo_v) | (hi_v < inp - radius)) & live
        faults = tl.max(outside.to(tl.int32), 0) * 1  # _OUTSIDE_BOX
    big = (tl.abs(out) > tl.full([], limit, ACC)) & (tl.abs(x) <= FINITE) & (tl.abs(inp) <= FINITE) & live
    faults = faults | tl.max(big.to(tl.int32), 0) * 2  # _OVERFLOW
    if faults != 0:
        tl.atomic_or(flags_ptr, faults)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live)


def _describe(op: str, name: str, t: torch.Tensor, x: torch.Tensor):
    """(tensor or None, scalar, run, period) of an operand, as csrc/adversarial.h's describe_operand."""
    if t.dim() == 0 and t.device.type == "cpu":
        return None, float(t), 1, 1
    if t.device != x.device:
        raise RuntimeError(f"{op}: {name} must be a 0-d CPU tensor or on x's device ({x.device}), got {t.device}")
    if t.dtype != acc_dtype(x)[0]:
        raise RuntimeError(f"{op}: {name} must be {acc_dtype(x)[0]} (x's opmath dtype), got {t.dtype}")
    try:
        broadcast = torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != x.shape:
        raise RuntimeError(f"{op}: {name} of shape {tuple(t.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    run, period, closed, described = 1, 1, False, True
    lead = x.dim() - t.dim()
    for d in range(x.dim() - 1, -1, -1):
        size = x.shape[d]
        if size == 1:
            continue
        if d >= lead and t.shape[d - lead] != 1:
            described = described and not closed
            period *= size
        elif period > 1:
            closed = True
        else:
            run *= size
    if not described:
        return t.expand(x.shape).contiguous(), 0.0, 1, x.numel()
    return t.contiguous(), 0.0, run, period


def _launch(op, x, orig, grad, step, eps, clamp_min, clamp_max, out):
    is_pgd = orig is not None
    for t in (x, grad) + ((orig,) if is_pgd else ()):
        if t.shape != out.shape or t.dtype != out.dtype or t.device != out.device or not t.is_contiguous():
            raise RuntimeError(f"{op}: every input must be contiguous, on x's device, with x's shape and dtype")
    if not out.is_contiguous():
        raise RuntimeError(f"{op}: out must be contiguous")
    if (clamp_min is None) != (clamp_max is None):
        raise RuntimeError(f"{op}: clamp_min and clamp_max must both be given or both be None")
    clamp = clamp_min is not None
    operands = [_describe(op, "step_size" if is_pgd else "eps", step, out)]
    operands.append(_describe(op, "eps", eps, out) if is_pgd else operands[0])
    operands += [_describe(op, n, t, out) for n, t in (("clamp_min", clamp_min), ("clamp_max", clamp_max))] if clamp \
        else [(None, 0.0, 1, 1)] * 2
    if out.numel() == 0:
        return
    acc_torch, acc = acc_dtype(out)
    flags = torch.zeros((), dtype=torch.int32, device=out.device)
    args = []
    for tensor, value, run, period in operands:
        args += [out if tensor is None else tensor, value, run, period]
    _step_kernel[(triton.cdiv(out.numel(), BLOCK),)](
        x, orig if is_pgd else x, grad, out, flags, out.numel(), *args, _LIMITS[out.dtype],
        IS_PGD=is_pgd, CLAMP=clamp, STEP_T=operands[0][0] is not None, EPS_T=operands[1][0] is not None,
        LO_T=operands[2][0] is not None, HI_T=operands[3][0] is not None, ACC=acc,
        FINITE=torch.finfo(acc_torch).max, BLOCK=BLOCK,
    )
    _check_faults(op, flags, is_pgd, out.dtype)


def _check_faults(op, flags, is_pgd, dtype):
    inp = "x_orig" if is_pgd else "x"
    box = (f"{op}: {inp} lies farther than eps outside the clamp box [clamp_min, clamp_max], so the clamp would move "
           f"the result more than eps from {inp}. {_FIX}")
    overflow = (f"{op}: the step is not finite in {str(dtype)[6:]}: {'step_size and eps are' if is_pgd else 'eps is'} beyond "
                f"its range for this input (largest finite value {torch.finfo(dtype).max:g}). Use a smaller value, a "
                "clamp within the range, or a wider dtype.")
    if flags.device.type == "cpu":
        bits = int(flags)
        if bits & _OUTSIDE_BOX:
            raise ValueError(box)
        if bits & _OVERFLOW:
            raise ValueError(overflow)
    else:
        torch._assert_async(flags == 0, f"{box} Or: {overflow}")


def fgsm_perturb(x, grad, eps, clamp_min, clamp_max):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch("fgsm_perturb", x, None, grad, eps, eps, clamp_min, clamp_max, out)
    return out


def fgsm_perturb_(x, grad, eps, clamp_min, clamp_max) -> None:
    _launch("fgsm_perturb_", x, None, grad, eps, eps, clamp_min, clamp_max, x)


def pgd_step(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
    out = torch.empty_like(x_adv, memory_format=torch.contiguous_format)
    _launch("pgd_step", x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max, out)
    return out


def pgd_step_(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max) -> None:
    _launch("pgd_step_", x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max, x_adv)


def compile_targets():
    """Every variant _launch above can pick, for tests/test_triton_aot.py, which compiles them
    ahead of time for GPU targets: [(kernel, signature, constexprs, options)].

    Keep in step with _launch: one entry per dtype, step (FGSM or PGD), clamp, operand kind
    (0-d scalar, or a broadcast tensor in the compute dtype; an absent one is replaced by
    ``out``) and index width (numel past 2^31 - 1 arrives as i64).
    """
    targets = []
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for is_pgd, clamp, numel in itertools.product((False, True), (False, True), ("i32", "i64")):
            operands = ["step"] + (["eps"] if is_pgd else []) + (["lo", "hi"] if clamp else [])
            for tensors in itertools.product((False, True), repeat=len(operands)):
                is_tensor = dict(zip(operands, tensors))
                if not is_pgd:
                    is_tensor["eps"] = is_tensor["step"]  # FGSM's eps is its step, one operand passed twice
                signature = {"x_ptr": f"*{dtype}", "orig_ptr": f"*{dtype}", "g_ptr": f"*{dtype}",
                             "out_ptr": f"*{dtype}", "flags_ptr": "*i32", "numel": numel}
                for name in ("step", "eps", "lo", "hi"):
                    signature.update({f"{name}_ptr": f"*{acc if is_tensor.get(name) else dtype}", name: "fp64",
                                      f"{name}_run": numel, f"{name}_period": numel})
                signature["limit"] = "fp64"
                constexprs = {"IS_PGD": is_pgd, "CLAMP": clamp, "STEP_T": is_tensor["step"],
                              "EPS_T": is_tensor["eps"],
                              "LO_T": is_tensor.get("lo", False), "HI_T": is_tensor.get("hi", False),
                              "ACC": tl.float64 if acc == "fp64" else tl.float32,
                              "FINITE": torch.finfo(torch.float64 if acc == "fp64" else torch.float32).max,
                              "BLOCK": BLOCK}
                signature.update({name: "constexpr" for name in constexprs})
                targets.append((_step_kernel, signature, constexprs, {"num_warps": 4}))
    return targets
