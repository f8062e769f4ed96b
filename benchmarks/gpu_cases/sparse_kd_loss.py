"""GPU timing cases of sparse_kd_loss: a stored top-64 teacher against LLM vocabularies.

Variants: reference.py eager, torch.compile(reference.py) and each lepton_fast backend that
can run on the device, forward+backward as in gpu_cases/kd_loss.py (whose step they share).
Minimum traffic: read the student's logits once and write their gradient once,
2 * N * V * itemsize bytes (the teacher's N * K entries are noise beside it).

Prediction (H100/H200, bf16, N=16384, V=128256, K=64): both kernels are one read and one
write of the row, so ~80 % of the copy bandwidth, as fused_kd_loss's target; the Triton
kernel's walk through the listed columns adds ~K compares per row block, nothing at this V.
"""
from __future__ import annotations

import torch

from benchmarks.gpu_cases import Case
from benchmarks.gpu_cases.kd_loss import _DTYPE_NAMES, _step

SHAPES = [(16384, 128256, torch.bfloat16), (8192, 32000, torch.bfloat16)]
DRY_RUN_SHAPES = [(4, 300, torch.bfloat16), (8, 37, torch.float32)]
TOP_K, TEMPERATURE = 64, 2.0


class _Inputs:
    """Student logits and the teacher's top-k as (indices, log-probabilities), made on first
    use (the warm-up call) and kept."""

    def __init__(self, n, v, dtype, device):
        self.spec = (n, v, dtype, device)
        self.tensors = None

    def get(self):
        if self.tensors is None:
            n, v, dtype, device = self.spec
            g = torch.Generator(device=device).manual_seed(0)
            student = torch.randn(n, v, device=device, dtype=dtype, generator=g).mul_(2)
            teacher = torch.randn(n, v, device=device, dtype=torch.float32, generator=g).mul_(2)
            logprobs, indices = torch.log_softmax(teacher, dim=-1).topk(min(TOP_K, v), dim=-1)
            self.tensors = (student.requires_grad_(True), (indices, logprobs))
        return self.tensors


def cases(device) -> list[Case]:
    from lepton_fast import _backend, reference, sparse_kd_loss
    from lepton_fast.ops.sparse_kd_loss import SPEC

    device = torch.device(device)
    shapes = SHAPES if device.type == "cuda" else DRY_RUN_SHAPES
    backends = [b for b in ("cuda", "triton", "cpu") if _backend.unavailable(SPEC, b, device.type) is None]

    def reference_loss(student, teacher):
        return reference.sparse_kd_loss(student, *teacher, temperature=TEMPERATURE)

    out = []
    for n, v, dtype in shapes:
        inputs = _Inputs(n, v, dtype, device)
        variants = {backend: _step(lambda s, t, backend=backend: sparse_kd_loss(
            s, *t, temperature=TEMPERATURE, backend=backend), inputs) for backend in backends}
        variants["reference eager"] = _step(reference_loss, inputs)
        variants["torch.compile(reference)"] = _step(torch.compile(reference_loss, dynamic=False), inputs)
        itemsize = torch.empty((), dtype=dtype).element_size()
        out.append(Case(name=f"sparse_kd_loss N={n} V={v} K={TOP_K} {_DTYPE_NAMES[dtype]} fwd+bwd",
                        min_bytes=2 * n * v * itemsize, variants=variants))
    return out
