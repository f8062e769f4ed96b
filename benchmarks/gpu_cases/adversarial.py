"""GPU timing cases of pgd_step and fgsm_perturb (see gpu_cases/__init__.py for the contract).

Pure bandwidth: pgd_step reads x_adv, x_orig, grad and writes one result (4 tensors moved),
fgsm_perturb reads x, grad and writes one (3). Target: >= 85% of measured copy bandwidth,
with constant operands and with the broadcast ones of a normalised image (per-channel clamp
box, per-sample eps), which the kernels read per pack instead of per element.
On a CPU device (gpu_check.py --dry-run) the shape shrinks to a smoke-test size.
"""
from __future__ import annotations

import torch

import lepton_fast
from lepton_fast import _backend, reference
from lepton_fast.ops import adversarial as adv_ops

from . import Case

SHAPE = (256, 3, 224, 224)
DRY_RUN_SHAPE = (2, 3, 8, 8)
EPS, STEP = 8 / 255, 2 / 255


def _backends(spec, device):
    return [b for b in ("cuda", "triton") if _backend.unavailable(spec, b, device.type) is None]


def _pgd_case(device, shape, dtype, normalised):
    g = torch.Generator(device=device).manual_seed(0)
    x_orig = torch.rand(shape, generator=g, device=device)
    x_adv = (x_orig + EPS * (2 * torch.rand(shape, generator=g, device=device) - 1)).clamp_(0, 1)
    grad = torch.randn(shape, generator=g, device=device).to(dtype)
    eps, clamp, operands = EPS, (0.0, 1.0), ""
    if normalised:
        mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(3, 1, 1)
        x_orig, x_adv = (x_orig - mean) / std, (x_adv - mean) / std
        eps = torch.full((shape[0], 1, 1, 1), EPS, device=device) / std.max()
        clamp, operands = ((0 - mean) / std, (1 - mean) / std), " per-channel clamp, per-sample eps"
    x_orig, x_adv = x_orig.to(dtype), x_adv.to(dtype)
    nbytes = x_orig.numel() * x_orig.element_size()
    name = f"pgd_step {'x'.join(map(str, shape))}{operands} {str(dtype).replace('torch.', '')} fwd"
    case = Case(name, min_bytes=4 * nbytes)
    case.variants["eager"] = lambda: reference.pgd_step(x_adv, x_orig, grad, STEP, eps, clamp)
    compiled = torch.compile(reference.pgd_step, fullgraph=True)
    case.variants["compiled"] = lambda: compiled(x_adv, x_orig, grad, STEP, eps, clamp)
    target = x_adv.clone()
    for b in _backends(adv_ops.PGD_SPEC, device):
        case.variants[b] = lambda b=b: lepton_fast.pgd_step(x_adv, x_orig, grad, STEP, eps, clamp, backend=b)
        case.variants[f"{b} in-place"] = lambda b=b: lepton_fast.pgd_step_(target, x_orig, grad, STEP, eps, clamp,
                                                                           backend=b)
    return case


def _fgsm_case(device, shape, dtype):
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(shape, generator=g, device=device).to(dtype)
    grad = torch.randn(shape, generator=g, device=device).to(dtype)
    nbytes = x.numel() * x.element_size()
    case = Case(f"fgsm_perturb {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} fwd",
                min_bytes=3 * nbytes)
    case.variants["eager"] = lambda: reference.fgsm_perturb(x, grad, EPS)
    compiled = torch.compile(reference.fgsm_perturb, fullgraph=True)
    case.variants["compiled"] = lambda: compiled(x, grad, EPS)
    for b in _backends(adv_ops.FGSM_SPEC, device):
        case.variants[b] = lambda b=b: lepton_fast.fgsm_perturb(x, grad, EPS, backend=b)
    return case


def cases(device) -> list[Case]:
    device = torch.device(device)
    shape = SHAPE if device.type == "cuda" else DRY_RUN_SHAPE
    return [
        _pgd_case(device, shape, torch.float32, normalised=False),
        _pgd_case(device, shape, torch.float32, normalised=True),
        _pgd_case(device, shape, torch.bfloat16, normalised=False),
        _fgsm_case(device, shape, torch.float32),
        _fgsm_case(device, shape, torch.bfloat16),
    ]
