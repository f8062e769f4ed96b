"""fused_linear_kd_loss against materialised PyTorch, torch.compile, Liger-Kernel, TRL and the GEMMs.

    python benchmarks/bench_fused_linear.py [--rounds 3] [--threads 2] [--case jsd|sparse] [--shape NxHxV]

The CPU case of the LLM-scale issue: float32, N=2048 tokens, H=1024 (student and teacher),
V=32000, generalized JSD beta=0.5 at T=1 without T², forward + backward (the loss and the
gradients of the student's hidden states and lm_head weight). Variants:

- materialised eager: both [N, V] logits, then reference.fused_kd_loss (autograd);
- materialised torch.compile: the same under torch.compile;
- Liger-Kernel 0.8.5's chunked ``LigerFusedLinearJSDLoss`` (soft loss only);
- TRL 1.16's ``_chunked_divergence_loss`` (DistillationTrainer);
- lepton_fast.fused_linear_kd_loss;
- the four bare GEMMs (student and teacher logits, d hidden, d weight): the floor.

``--case sparse``: distillation from the teacher's stored top-k instead, K=64 forward KL
(``truncation="renormalize"``, axolotl's ``normalize_topk=True``), same N, H, V: the
materialised reference (student logits, then reference.sparse_kd_loss), lepton_fast's
``fused_linear_sparse_kd_loss``, axolotl's chunked fused-linear top-k loss (its KD trainer's
loss, kernels/liger.py, transcribed in plain PyTorch in tests/axolotl_kd.py: chunks of 1024
rows, ``torch.func.grad_and_value`` per chunk, eager; the memory target's baseline) and the
three bare GEMMs of the student (logits, d hidden, d weight), its floor.

Variants run round by round in rotating order (benchmarks/conftest.py: alternate), each
round on fresh random inputs; the peak memory above the inputs is measured once per variant,
untimed, twice: from torch.profiler's CPU allocator events (the returned gradients included)
and as the peak resident memory above the step's start (VmHWM, Linux), which also counts the
CPU kernels' gradient block that their own allocator holds (csrc/cpu/grad_buffer.h) and the
profiler does not see. ``--rounds 0`` measures the memory only.
Variants whose package is not installed are left out. Results: benchmarks/RESULTS.md, section
"fused_linear_kd_loss on CPU". `pytest benchmarks --benchmark-disable` runs every variant of
both cases once on a small shape and checks that they agree.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import alternate, load_average, peak_extra_bytes, peak_rss_extra_bytes  # noqa: E402

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from axolotl_kd import AxolotlChunkedTopKLoss, axolotl_collated_logprobs  # noqa: E402  (tests/axolotl_kd.py)

from lepton_fast import fused_linear_kd_loss, fused_linear_sparse_kd_loss, reference  # noqa: E402

FULL = dict(n=2048, h=1024, v=32000)
SMOKE = dict(n=48, h=32, v=500)
BETA = 0.5
SPARSE = dict(divergence="forward_kl", truncation="renormalize")  # the sparse case's loss
TOP_K = 64
AXOLOTL_CHUNK = 1024  # LigerFusedLinearKLTopKLogprobLoss's default, which axolotl's trainer keeps


def make_inputs(n, h, v, seed=None):
    """Fresh student/teacher hidden states and heads; the student's require grad."""
    g = torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % 2**31)
    return dict(
        student_hidden=torch.randn(n, h, generator=g).requires_grad_(),
        student_weight=(torch.randn(v, h, generator=g) * (2 / h**0.5)).requires_grad_(),
        teacher_hidden=torch.randn(n, h, generator=g),
        teacher_weight=torch.randn(v, h, generator=g) * (2 / h**0.5),
        labels=torch.randint(0, v, (n,), generator=g),
    )


def _materialised(x):
    return reference.fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                          x["teacher_weight"], divergence="jsd", beta=BETA, scale_by_t2=False)


def _ours(x):
    return fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                                divergence="jsd", beta=BETA, scale_by_t2=False)


def _gemms(x):
    """The GEMMs of the op, alone: [N, V] logits of the student (and of the teacher when it has a
    head), then d hidden = G @ W and d weight = G.T @ h with the student's logits standing in
    for G. No loss: returns None."""
    with torch.no_grad():
        hs, ws = x["student_hidden"], x["student_weight"]
        z = hs @ ws.T
        if "teacher_weight" in x:
            x["teacher_hidden"] @ x["teacher_weight"].T
        z @ ws
        z.T @ hs


def make_sparse_inputs(n, h, v, seed=None, k=TOP_K):
    """The student's hidden states and head (requiring grad), labels, and a teacher's top-k
    log-probabilities (of random logits of spread 2), as a teacher would have stored them."""
    g = torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % 2**31)
    logprobs, indices = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).topk(k, -1)
    return dict(
        student_hidden=torch.randn(n, h, generator=g).requires_grad_(),
        student_weight=(torch.randn(v, h, generator=g) * (2 / h**0.5)).requires_grad_(),
        teacher_indices=indices,
        teacher_logprobs=logprobs,
    )


def _sparse_materialised(x):
    return reference.fused_linear_sparse_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_indices"],
                                                 x["teacher_logprobs"], **SPARSE)


def _sparse_ours(x):
    return fused_linear_sparse_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_indices"],
                                       x["teacher_logprobs"], **SPARSE)


def _sparse_axolotl(x):
    """axolotl's trainer loss on its input format: the log-probabilities as its collator stores
    them (renormalised over the K entries) and an all-True mask, made here (N·K·9 bytes, well
    under 1 % of the peak at the full shape); the sum divided by N, as its model forward
    divides by ``num_items_in_batch`` (so the backward scales the saved gradients)."""
    hidden, ids = x["student_hidden"], x["teacher_indices"]
    return AxolotlChunkedTopKLoss.apply(hidden, x["student_weight"], ids,
                                        axolotl_collated_logprobs(x["teacher_logprobs"], 1.0),
                                        torch.ones_like(ids, dtype=torch.bool), 1.0, True, AXOLOTL_CHUNK) / len(hidden)


def sparse_loss_functions() -> dict:
    """name -> loss(inputs) of the sparse case's variants (the GEMM floor returns None)."""
    return {"materialised eager": _sparse_materialised,
            "lepton_fast.fused_linear_sparse_kd_loss": _sparse_ours,
            "axolotl chunked top-k (transcribed)": _sparse_axolotl,
            "three bare GEMMs": _gemms}


def loss_functions() -> dict:
    """name -> loss(inputs) (None for the GEMM floor, which has no loss) of every variant here."""
    out = {
        "materialised eager": _materialised,
        "materialised torch.compile": torch.compile(_materialised, dynamic=False),
    }
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA)
        out["Liger LigerFusedLinearJSDLoss"] = lambda x: liger(
            x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"])
    if importlib.util.find_spec("trl") is not None:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        out["TRL _chunked_divergence_loss"] = lambda x: _chunked_divergence_loss(
            x["student_hidden"][None], x["teacher_hidden"][None], x["student_weight"], x["teacher_weight"],
            torch.ones(1, x["student_hidden"].shape[0], dtype=torch.long), BETA)[0]
    out["lepton_fast.fused_linear_kd_loss"] = _ours
    out["four bare GEMMs"] = _gemms
    return out


# --case: (inputs(n, h, v, seed=None), the variants, its description)
CASES = {"jsd": (make_inputs, loss_functions, f"jsd beta={BETA}"),
         "sparse": (make_sparse_inputs, sparse_loss_functions, f"top-{TOP_K} {SPARSE}")}


def step(loss_fn, x):
    """One forward + backward; returns the loss (None for a GEMM floor)."""
    loss = loss_fn(x)
    if loss is None:
        return None
    loss.backward()
    return loss.detach()


def timed(loss_fn, make, shape):
    def run():
        x = make(**shape)
        start = time.perf_counter()
        step(loss_fn, x)
        return time.perf_counter() - start

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; 0: the peak memory only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", help="comma-separated substrings of the variants to run")
    parser.add_argument("--case", choices=sorted(CASES), default="jsd")
    parser.add_argument("--shape", default="{n}x{h}x{v}".format(**FULL), help="N x H x V (default %(default)s)")
    args = parser.parse_args(argv)
    shape = dict(zip("nhv", map(int, args.shape.split("x"))))
    torch.set_num_threads(args.threads)
    make, functions, description = CASES[args.case]
    fns = functions()
    if args.only:
        keep = args.only.split(",")
        fns = {k: f for k, f in fns.items() if any(s in k for s in keep)}
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, N={shape['n']} H={shape['h']} V={shape['v']} float32 {description}, "
          f"load {load_average()}", flush=True)
    peaks, rss = {}, {}
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    for name, fn in fns.items():  # warm-up (compilation, first touch) and the untimed peak
        x = make(**shape)
        step(fn, x)
        for t in x.values():
            t.grad = None
        peaks[name] = peak_extra_bytes(lambda x=x: step(fn, x))
        for t in x.values():
            t.grad = None
        rss[name] = peak_rss_extra_bytes(lambda x=x: step(fn, x))
        print(f"warm-up {name}: peak {peaks[name] / 2**20:.0f} MiB, resident {mib(rss[name])} MiB, "
              f"load {load_average()}", flush=True)
        del x
    times = alternate({name: timed(fn, make, shape) for name, fn in fns.items()}, args.rounds,
                      log=lambda m: print(m, flush=True))
    floors = [statistics.median(ts) for name, ts in times.items() if fns[name] is _gemms and ts]
    floor = floors[0] if floors else None
    print("\n| variant | median s | min s | max s | x GEMMs | peak MiB above inputs | resident peak MiB |\n"
          "|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        cells = ["-"] * 4
        if ts:
            med = statistics.median(ts)
            cells = [f"{med:.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}", f"{med / floor:.2f}" if floor else "-"]
        print(f"| {name} | {' | '.join(cells)} | {mib(peaks[name])} | {mib(rss[name])} |")
    print(f"\nload at the end {load_average()}")
    return 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_variant_agrees_on_a_small_shape(case):
    """The smoke run (`pytest benchmarks --benchmark-disable`): every variant once, small."""
    make, functions, _ = CASES[case]
    x = make(**SMOKE, seed=0)
    variants = functions()
    want = step(variants["materialised eager"], {
        k: (t.detach().double() if t.is_floating_point() else t).requires_grad_(t.requires_grad)
        for k, t in x.items() if k != "labels"})
    for name, fn in variants.items():
        inputs = {k: t.detach().clone().requires_grad_(t.requires_grad) for k, t in x.items()}
        loss = step(fn, inputs)
        if loss is not None:
            torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":
    sys.exit(main())
