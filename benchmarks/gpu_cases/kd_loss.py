"""GPU timing cases of fused_kd_loss: forward+backward at LLM and classifier vocabularies.

Variants: reference.py eager, torch.compile(reference.py), and each lepton_fast backend that
can run on the device ("cuda", "triton"; "cpu" on CPU). Every variant computes the loss and
d(loss)/d(student) with torch.autograd.grad and returns nothing, so that after the warm-up
call only the inputs stay allocated and gpu_check.py's peak memory is what one step adds.

Minimum traffic: read student and teacher once, write the gradient once,
3 * N * C * itemsize bytes. On a CPU device (gpu_check.py --dry-run) the shapes shrink to a
smoke-test size, so that the harness can be checked without a GPU.
"""
from __future__ import annotations

import torch

from benchmarks.gpu_cases import Case

# (N, C, dtype): Llama-3 vocabulary, Llama-2 / Mistral, Qwen2 in float32, ImageNet classes.
SHAPES = [
    (16384, 128256, torch.bfloat16),
    (8192, 32000, torch.bfloat16),
    (4096, 151936, torch.float32),
    (65536, 1000, torch.float32),
]
DRY_RUN_SHAPES = [(4, 300, torch.bfloat16), (8, 37, torch.float32)]
TEMPERATURE = 2.0
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class _Inputs:
    """Student and teacher logits, created on first use (the warm-up call) and kept."""

    def __init__(self, n, c, dtype, device):
        self.spec = (n, c, dtype, device)
        self.tensors = None

    def get(self):
        if self.tensors is None:
            n, c, dtype, device = self.spec
            g = torch.Generator(device=device).manual_seed(0)
            student = torch.randn(n, c, device=device, dtype=dtype, generator=g).mul_(2)
            teacher = torch.randn(n, c, device=device, dtype=dtype, generator=g).mul_(2)
            self.tensors = (student.requires_grad_(True), teacher)
        return self.tensors


def _step(loss_fn, inputs):
    def run():
        student, teacher = inputs.get()
        loss = loss_fn(student, teacher)
        torch.autograd.grad(loss, student)

    return run


def cases(device) -> list[Case]:
    from lepton_fast import _backend, fused_kd_loss, reference
    from lepton_fast.ops.kd_loss import SPEC

    device = torch.device(device)
    shapes = SHAPES if device.type == "cuda" else DRY_RUN_SHAPES
    backends = [b for b in ("cuda", "triton", "cpu") if _backend.unavailable(SPEC, b, device.type) is None]

    def reference_loss(student, teacher):
        return reference.fused_kd_loss(student, teacher, TEMPERATURE)

    out = []
    for n, c, dtype in shapes:
        inputs = _Inputs(n, c, dtype, device)
        # lepton_fast first: if gpu_check.py's time budget runs out, the compile of the
        # reference (tens of seconds per shape) is what gets skipped.
        variants = {}
        for backend in backends:
            variants[backend] = _step(
                lambda s, t, backend=backend: fused_kd_loss(s, t, TEMPERATURE, backend=backend), inputs
            )
        variants["reference eager"] = _step(reference_loss, inputs)
        variants["torch.compile(reference)"] = _step(torch.compile(reference_loss, dynamic=False), inputs)
        itemsize = torch.empty((), dtype=dtype).element_size()
        out.append(
            Case(
                name=f"kd_loss N={n} C={c} {_DTYPE_NAMES[dtype]} fwd+bwd",
                min_bytes=3 * n * c * itemsize,
                variants=variants,
            )
        )
    return out
