"""GPU timing cases of pgd_step and fgsm_perturb (see gpu_cases/__init__.py for the contract).

Pure bandwidth: pgd_step reads x_adv, x_orig, grad and writes one result (4 tensors moved),
fgsm_perturb reads x, grad and writes one (3). Target: >= 85% of measured copy bandwidth.
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


def cases(device) -> list[Case]:
    device = torch.device(device)
    shape = SHAPE if device.type == "cuda" else DRY_RUN_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(0)
        x_orig = torch.rand(shape, generator=g, device=device).to(dtype)
        x_adv = (x_orig.float() + EPS * (2 * torch.rand(shape, generator=g, device=device) - 1)).clamp_(0, 1).to(dtype)
        grad = torch.randn(shape, generator=g, device=device).to(dtype)
        nbytes = x_orig.numel() * x_orig.element_size()
        name = "x".join(map(str, shape))
        dt = str(dtype).replace("torch.", "")

        pgd = Case(f"pgd_step {name} {dt} fwd", min_bytes=4 * nbytes)
        pgd.variants["eager"] = lambda a=x_adv, o=x_orig, gr=grad: reference.pgd_step(a, o, gr, STEP, EPS)
        compiled_pgd = torch.compile(lambda a, o, gr: reference.pgd_step(a, o, gr, STEP, EPS), fullgraph=True)
        pgd.variants["compiled"] = lambda a=x_adv, o=x_orig, gr=grad, f=compiled_pgd: f(a, o, gr)
        target = x_adv.clone()
        for b in _backends(adv_ops.PGD_SPEC, device):
            pgd.variants[b] = lambda a=x_adv, o=x_orig, gr=grad, b=b: lepton_fast.pgd_step(a, o, gr, STEP, EPS, backend=b)
            pgd.variants[f"{b} in-place"] = lambda t=target, o=x_orig, gr=grad, b=b: lepton_fast.pgd_step_(
                t, o, gr, STEP, EPS, backend=b)
        out.append(pgd)

        fgsm = Case(f"fgsm_perturb {name} {dt} fwd", min_bytes=3 * nbytes)
        fgsm.variants["eager"] = lambda x=x_orig, gr=grad: reference.fgsm_perturb(x, gr, EPS)
        compiled_fgsm = torch.compile(lambda x, gr: reference.fgsm_perturb(x, gr, EPS), fullgraph=True)
        fgsm.variants["compiled"] = lambda x=x_orig, gr=grad, f=compiled_fgsm: f(x, gr)
        for b in _backends(adv_ops.FGSM_SPEC, device):
            fgsm.variants[b] = lambda x=x_orig, gr=grad, b=b: lepton_fast.fgsm_perturb(x, gr, EPS, backend=b)
        out.append(fgsm)
    return out
