"""GPU timing case of fused_linear_kd_loss: the LLM-scale issue's H200 case.

bfloat16, N=16384 tokens, H=4096 (student and teacher), V=128256 (Llama-3), generalized JSD
beta=0.5, forward + backward (gradients of the student's hidden states and lm_head weight).
Targets: peak memory beyond inputs and gradients <= 4 GB, time <= 1.25x the four cuBLAS
GEMMs. Variants: lepton_fast (each row-kernel backend that runs here), the four bare GEMMs
(student and teacher logits with float32 output, d hidden and d weight in bfloat16), and
Liger-Kernel's chunked LigerFusedLinearJSDLoss when it is installed. The materialised
reference is left out: its [N, V] float32 intermediates need ~60 GB and minutes to compile.

gpu_check.py reports the peak a call adds to the inputs; the gradients it returns (d hidden
N·H and d weight V·H in bfloat16, 0.6 GiB here) are part of that figure, so the 4 GB target
reads as peak - 0.6 GiB. ``min_bytes`` is what any implementation must move (read both heads
and hidden states, write both gradients); the op is compute-bound (8·N·H·V = 69 TFLOP), so its
GB/s column says little. On a CPU device (gpu_check.py --dry-run) the shape shrinks.
"""
from __future__ import annotations

import torch

from benchmarks.gpu_cases import Case

SHAPE = (16384, 4096, 128256)
DRY_RUN_SHAPE = (64, 32, 300)
BETA = 0.5


class _Inputs:
    """Hidden states and heads, created on first use (the warm-up call) and kept."""

    def __init__(self, n, h, v, dtype, device):
        self.spec = (n, h, v, dtype, device)
        self.tensors = None

    def get(self):
        if self.tensors is None:
            n, h, v, dtype, device = self.spec
            g = torch.Generator(device=device).manual_seed(0)

            def randn(*shape, scale=1.0):
                return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

            self.tensors = (randn(n, h).requires_grad_(), randn(v, h, scale=2 / h**0.5).requires_grad_(),
                            randn(n, h), randn(v, h, scale=2 / h**0.5))
        return self.tensors


def _step(loss_fn, inputs):
    def run():
        hs, ws, ht, wt = inputs.get()
        loss = loss_fn(hs, ws, ht, wt)
        torch.autograd.grad(loss, (hs, ws))

    return run


def _gemms(inputs):
    def run():
        hs, ws, ht, wt = (t.detach() for t in inputs.get())
        out = torch.float32 if hs.device.type == "cuda" else hs.dtype
        z = torch.mm(hs, ws.T, out_dtype=out) if out != hs.dtype else hs @ ws.T
        torch.mm(ht, wt.T, out_dtype=out) if out != ht.dtype else ht @ wt.T
        g = z.to(hs.dtype)
        del z
        g @ ws
        g.T @ hs

    return run


def cases(device) -> list[Case]:
    import importlib.util

    from lepton_fast import _backend, fused_linear_kd_loss
    from lepton_fast.ops.kd_loss import SPEC

    device = torch.device(device)
    n, h, v = SHAPE if device.type == "cuda" else DRY_RUN_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = _Inputs(n, h, v, dtype, device)
    variants = {}
    for backend in ("cuda", "triton", "cpu"):
        if _backend.unavailable(SPEC, backend, device.type) is None:
            variants[backend] = _step(
                lambda hs, ws, ht, wt, b=backend: fused_linear_kd_loss(hs, ws, ht, wt, divergence="jsd", beta=BETA,
                                                                       scale_by_t2=False, backend=b), inputs)
    variants["four bare GEMMs"] = _gemms(inputs)
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        variants["Liger LigerFusedLinearJSDLoss"] = _step(lambda hs, ws, ht, wt: liger(hs, ws, ht, wt, labels), inputs)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [Case(name=f"fused_linear_kd_loss N={n} H={h} V={v} {'bf16' if dtype == torch.bfloat16 else 'fp32'} "
                      "jsd fwd+bwd",
                 min_bytes=(3 * v * h + 3 * n * h) * itemsize, variants=variants)]
