"""GPU timing cases of fused_pseudo_label_loss (contract in __init__.py).

On a CPU device (gpu_check.py --dry-run) the shape shrinks to a smoke-test size."""
from __future__ import annotations

import torch

from lepton_fast import _backend, fused_pseudo_label_loss, reference
from lepton_fast.ops import pseudo_labels as op

from . import Case


def cases(device) -> list[Case]:
    n, c = (65536, 1000) if device.type == "cuda" else (64, 100)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    strong = torch.randn(n, c, device=device, dtype=dtype, generator=g).requires_grad_()
    weak = (torch.randn(n, c, device=device, generator=g) * 4).to(dtype)
    threshold = float(reference.select_pseudo_labels(weak)[1].median())  # half the rows selected
    compiled = torch.compile(lambda s, w: reference.fused_pseudo_label_loss(s, w, threshold))

    def run(loss_fn):
        def step():
            strong.grad = None
            loss_fn().backward()
        return step

    variants = {
        "reference": run(lambda: reference.fused_pseudo_label_loss(strong, weak, threshold)[0]),
        "compile(reference)": run(lambda: compiled(strong, weak)[0]),
    }
    for backend in ("cuda", "triton"):
        if _backend.unavailable(op.LOSS_SPEC, backend, device.type) is None:
            variants[backend] = run(
                lambda b=backend: fused_pseudo_label_loss(strong, weak, threshold, backend=b).loss
            )
    # Read both views once, write the gradient once; the O(N) outputs are negligible.
    min_bytes = 3 * n * c * strong.element_size()
    return [Case(f"pseudo_labels {n}x{c} bfloat16 fwd+bwd", min_bytes, variants)]
