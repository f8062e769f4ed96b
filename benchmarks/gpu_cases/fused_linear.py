"""GPU timing cases of fused_linear_kd_loss and fused_linear_sparse_kd_loss at the H200 shape.

bfloat16, N=16384 tokens, H=4096 (student and teacher), V=128256 (Llama-3), generalized JSD
beta=0.5, forward + backward (gradients of the student's hidden states and lm_head weight).
Targets: peak memory beyond inputs and gradients <= 4 GB, time <= 1.25x the four cuBLAS
GEMMs. Variants: lepton_fast (each row-kernel backend that runs here), the four bare GEMMs
(student and teacher logits with float32 output, d hidden and d weight in bfloat16), and
Liger-Kernel's chunked LigerFusedLinearJSDLoss when it is installed. The materialised
reference is left out: its [N, V] float32 intermediates need ~60 GB and minutes to compile.

gpu_check.py reports the peak a call adds to the inputs; the gradients it returns (d hidden
N·H and d weight V·H in bfloat16, 1.1 GiB here) are part of that figure, so the 4 GB target
reads as peak - 1.1 GiB. ``min_bytes`` is what any implementation must move (read both heads
and hidden states, write both gradients); the op is compute-bound (8·N·H·V = 69 TFLOP), so its
GB/s column says little. On a CPU device (gpu_check.py --dry-run) the shape shrinks.

fused_linear_sparse_kd_loss (issue 22), same shape, the teacher's stored top-64 (int64 ids,
float32 log-probabilities summing to 1 over the 64), forward KL "renormalize", fwd+bwd.
Variants: lepton_fast per backend, the student's three bare GEMMs (logits with float32
output, d hidden, d weight) and axolotl's chunked top-k loss (tests/axolotl_kd.py: its
trainer's loss, eager, 1024-row chunks; the memory target's baseline). ``min_bytes``: read
the head and hidden states and the teacher, write both gradients. Prediction, written before
any GPU ran it (benchmarks/RESULTS.md, "fused_linear_sparse_kd_loss on GPU"):

- floor: 3 GEMMs = 6·N·H·V = 51.6 TFLOP, 52 ms at the H200's 989 TFLOP/s dense bf16 peak
  (the datasheet's figure without sparsity; cuBLAS reaches ~70-75 % of it on such shapes,
  so the bare GEMMs should take ~70-75 ms);
- the sparse teacher: N·K·(8 + 4) B = 12.6 MB, read once (~3 µs at 4.8 TB/s); the dense
  case's teacher head instead costs a fourth GEMM (17 TFLOP) and 4.2 GB of bf16 logits;
- ours: the bare GEMMs (whose variant also rounds its float32 logits to bf16 for the
  backward GEMMs, as ours rounds the gradient) plus the row kernel on each chunk's float32
  logits, which does not overlap them (one stream): ~8 B per logit (its read and its
  float32 gradient's write) = 17 GB, ~4-5 ms: **1.05-1.08x the bare GEMMs**, ~1.45x the
  52 ms floor;
- axolotl's: the same GEMMs, ~10 passes of float32 elementwise autograd over each [1024, V]
  chunk (the cast, log-sum-exp, gather and their backwards: ~85 GB) and 16 additions of a
  bf16 [V, H] chunk gradient into its accumulator (~50 GB): ~30 ms more, **~1.4x** the GEMMs;
- peak beyond the inputs, ours: the returned gradients 1.2 GB, the float32 d weight
  accumulator 2.1 GB, 832-row chunk buffers 1.1 GB: **~4.4 GB**. axolotl's: its bf16 [V, H]
  accumulator (1.05 GB), the chunk's float32 logits and their gradients (~4 x 0.5 GB at
  once during the log-sum-exp backward), then the chunk's own [V, H] weight gradient
  (1.05 GB): **~3.3-3.7 GB**. So here ours is predicted ~1.2-1.3x axolotl's, not 1/2 (the
  CPU float32 case, where the issue sets that target, has no accumulator beside the
  gradient): the float32 accumulation costs 2.1 GB that axolotl saves by summing 16 chunk
  gradients in bf16.
"""
from __future__ import annotations

import torch

from benchmarks.gpu_cases import Case

SHAPE = (16384, 4096, 128256)
DRY_RUN_SHAPE = (64, 32, 300)
BETA = 0.5
TOP_K = 64


class _Inputs:
    """The student's hidden states and head, then the teacher's (hidden states and head, or with
    ``top_k`` its stored top-k: ids and log-probabilities, made in O(N·K)), created on first use
    (the warm-up call) and kept."""

    def __init__(self, n, h, v, dtype, device, top_k=None):
        self.spec = (n, h, v, dtype, device, top_k)
        self.tensors = None

    def get(self):
        if self.tensors is None:
            n, h, v, dtype, device, top_k = self.spec
            g = torch.Generator(device=device).manual_seed(0)

            def randn(*shape, scale=1.0):
                return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

            student = (randn(n, h).requires_grad_(), randn(v, h, scale=2 / h**0.5).requires_grad_())
            if top_k is None:
                teacher = (randn(n, h), randn(v, h, scale=2 / h**0.5))
            else:  # top_k distinct classes per row, evenly spaced from a random start
                start = torch.randint(0, v, (n, 1), device=device, generator=g)
                ids = (start + torch.arange(top_k, device=device) * (v // top_k)) % v
                logprobs = torch.log_softmax(torch.randn(n, top_k, device=device, generator=g) * 2, -1)
                teacher = (ids, logprobs)
            self.tensors = student + teacher
        return self.tensors


def _step(loss_fn, inputs):
    def run():
        tensors = inputs.get()
        loss = loss_fn(*tensors)
        torch.autograd.grad(loss, tensors[:2])

    return run


def _gemms(inputs):
    """The op's bare GEMMs: the student's logits (float32 output on the GPU), the teacher's when
    it has a head, then d hidden and d weight with the rounded logits as the gradient."""
    def run():
        hs, ws, *teacher = (t.detach() for t in inputs.get())
        out = torch.float32 if hs.device.type == "cuda" else hs.dtype
        z = torch.mm(hs, ws.T, out_dtype=out) if out != hs.dtype else hs @ ws.T
        if teacher[0].is_floating_point():
            ht, wt = teacher
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
    name = f"N={n} H={h} V={v} {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
    return [Case(name=f"fused_linear_kd_loss {name} jsd fwd+bwd",
                 min_bytes=(3 * v * h + 3 * n * h) * itemsize, variants=variants),
            _sparse_case(n, h, v, dtype, device, name)]


def _sparse_case(n, h, v, dtype, device, name) -> Case:
    import os
    import sys

    from lepton_fast import _backend, fused_linear_sparse_kd_loss
    from lepton_fast.ops.sparse_kd_loss import SPEC

    sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 "tests"))
    from axolotl_kd import AxolotlChunkedTopKLoss  # tests/axolotl_kd.py

    inputs = _Inputs(n, h, v, dtype, device, top_k=min(TOP_K, v))
    variants = {}
    for backend in ("cuda", "triton", "cpu"):
        if _backend.unavailable(SPEC, backend, device.type) is None:
            variants[backend] = _step(lambda hs, ws, ids, lp, b=backend: fused_linear_sparse_kd_loss(
                hs, ws, ids, lp, backend=b), inputs)
    variants["three bare GEMMs"] = _gemms(inputs)
    variants["axolotl chunked top-k"] = _step(lambda hs, ws, ids, lp: AxolotlChunkedTopKLoss.apply(
        hs, ws, ids, lp, torch.ones_like(ids, dtype=torch.bool)) / n, inputs)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(name=f"fused_linear_sparse_kd_loss {name} K={min(TOP_K, v)} fwd+bwd",
                min_bytes=(2 * v * h + 2 * n * h) * itemsize + n * min(TOP_K, v) * 12, variants=variants)
