"""vocab_parallel_kd_loss on two gloo ranks against fused_kd_loss in one process (CPU); with
``--teacher-k K``, vocab_parallel_sparse_kd_loss against sparse_kd_loss instead.

    python benchmarks/bench_vocab_parallel.py                 # N=2048, V=32000, float32
    python benchmarks/bench_vocab_parallel.py --rows 512 --vocab 8000 --rounds 3
    python benchmarks/bench_vocab_parallel.py --teacher-k 64  # the sparse teacher, "tail"

A training step is the loss's forward and backward (forward KL, T = 2, labels with every
seventh row ignored, alpha 0.1) on fresh random logits (randn * 3, made outside the timed
region; the sparse teacher: K distinct classes per row spread over the vocabulary, with
log-probabilities that leave a tail of 0.1, the same on every rank). Each variant runs in
processes of its own, as it would in training (so that the CPU gradient buffer is recycled
from step to step, csrc/cpu/grad_buffer.h), and each round runs the variants one after the
other, so that the load of a shared machine falls on all of them:

- ``single, 2 threads``: fused_kd_loss on the whole [N, V] in one process with two intra-op
  threads: the same total work on the same two cores as the two ranks;
- ``single, 1 thread, V/2``: fused_kd_loss on one rank's [N, V/2] alone, one thread: a
  rank's share without the split;
- ``2 ranks x 1 thread``: vocab_parallel_kd_loss, each rank a [N, V/2] slice, two
  processes joined by gloo; a step's time is the slower rank's.

Memory: each process's peak resident memory over the whole run (VmHWM) above what it held
before its first step (torch and the process group loaded): its logits, its gradient
buffer, and whatever else a step allocates. Communication: every collective a rank runs in
a step, recorded at the dispatcher (tests/rank_pool.py's CollectiveRecorder), with the
bytes of their tensors, which is what a rank sends per step (a ring all-reduce over two
ranks sends each buffer once). Results: benchmarks/RESULTS.md, "vocab_parallel_kd_loss on
CPU (two gloo ranks)".
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # rank_pool

from rank_pool import CollectiveRecorder, RankPool  # noqa: E402  (tests/rank_pool.py)

from lepton_fast import fused_kd_loss, sparse_kd_loss  # noqa: E402
from lepton_fast.distributed import vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss  # noqa: E402

KW = dict(temperature=2.0, alpha=0.1)
SPARSE_KW = dict(KW, truncation="tail")


def logits(rows, cols, seed, teacher=True):
    """Student logits [rows, cols] (randn * 3) and, with ``teacher``, the teacher's alike (else None)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 3, torch.randn(rows, cols, generator=g) * 3 if teacher else None


def labels(rows, vocab, seed):
    """Class ids into the whole vocabulary, every seventh row ignored: the same on every rank."""
    y = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed))
    y[::7] = -100
    return y


def sparse_teacher(rows, vocab, k, seed):
    """(indices [rows, k], log-probabilities [rows, k]): k distinct classes per row, evenly
    spaced from a random start (so that every rank's slice holds some), listed mass 0.9.
    Built in O(rows k), so that no [rows, vocab] buffer shows in the memory peak."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    idx = (start + torch.arange(k) * (vocab // k)) % vocab
    return idx, torch.log_softmax(torch.randn(rows, k, generator=g) * 2, -1) + math.log(0.9)


def step(loss_fn, s, teacher, y):
    """A forward and backward of loss_fn (a dense form when ``teacher`` is one tensor, else the
    sparse form on (indices, log-probabilities))."""
    x = s.requires_grad_()
    if isinstance(teacher, tuple):
        loss_fn(x, *teacher, labels=y, **SPARSE_KW).backward()
    else:
        loss_fn(x, teacher, labels=y, **KW).backward()
    return x.grad


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_kib(field):
    """VmRSS or VmHWM of this process, KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _baseline(ctx):
    return memory_kib("VmRSS")


def _peak(ctx):
    return memory_kib("VmHWM")


def _single_step(ctx, rows, cols, threads, seed, k=0):
    """(seconds of a fused_kd_loss step on [rows, cols] in this process (sparse_kd_loss with a
    teacher of ``k`` entries), None)."""
    torch.set_num_threads(threads)
    s, t = logits(rows, cols, seed, teacher=not k)
    y = labels(rows, cols, seed)
    if k:
        t = sparse_teacher(rows, cols, k, seed)
    return timed(lambda: step(sparse_kd_loss if k else fused_kd_loss, s, t, y)), None


def _rank_step(ctx, rows, vocab, seed, record, k=0):
    """(seconds of a vocab_parallel_kd_loss step on this rank's slice (vocab_parallel_sparse_kd_loss
    with a teacher of ``k`` entries), the collectives of one more step when ``record``)."""
    cols = (vocab + 1) // 2 if ctx.rank == 0 else vocab // 2
    s, t = logits(rows, cols, 2 * seed + ctx.rank, teacher=not k)  # this rank's slice
    y = labels(rows, vocab, seed)
    if k:
        t = sparse_teacher(rows, vocab, k, seed)  # the same on every rank
    loss_fn = vocab_parallel_sparse_kd_loss if k else vocab_parallel_kd_loss
    dist.barrier()
    seconds = timed(lambda: step(loss_fn, s, t, y))
    if not record:
        return seconds, None
    s.grad = None
    with CollectiveRecorder() as rec:
        step(loss_fn, s, t, y)
    return seconds, rec.calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--teacher-k", type=int, default=0,
                        help="the sparse forms with a teacher of K entries per row (default: the dense forms)")
    args = parser.parse_args(argv)
    n, v, k = args.rows, args.vocab, args.teacher_k
    teacher = f'sparse teacher K={k}, "tail"' if k else "dense teacher"
    print(f"N={n} V={v} float32, {teacher}, forward KL T=2 + CE alpha=0.1, fwd+bwd; {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    variants = {
        "single, 2 threads": (RankPool(1, poison=False), lambda r: (_single_step, n, v, 2, r, k)),
        "single, 1 thread, V/2": (RankPool(1, poison=False), lambda r: (_single_step, n, v // 2, 1, r, k)),
        "2 ranks x 1 thread": (RankPool(2, poison=False), lambda r: (_rank_step, n, v, r, False, k)),
    }
    try:
        baseline = {name: max(pool.run(_baseline)) for name, (pool, _) in variants.items()}
        times = {name: [] for name in variants}
        loads = []
        for r in range(args.rounds + 1):  # round 0 warms up: first touch, the size exchange
            loads.append(os.getloadavg()[0])
            for name, (pool, case) in variants.items():
                answers = pool.run(*case(r))
                if r:
                    times[name].append(max(seconds for seconds, _ in answers))
        peak = {name: max(pool.run(_peak)) - baseline[name] for name, (pool, _) in variants.items()}
        calls = variants["2 ranks x 1 thread"][0].run(_rank_step, n, v, 0, True, k)[0][1]
    finally:
        for pool, _ in variants.values():
            pool.close()
    print(f"load average (1 min) during the rounds: {min(loads):.1f} to {max(loads):.1f}")
    base = statistics.median(times["single, 2 threads"])
    print(f"{'variant':24s} {'median ms':>10s} {'min ms':>8s} {'vs single':>9s} {'peak MiB/process':>17s}")
    for name, ts in times.items():
        print(f"{name:24s} {statistics.median(ts) * 1e3:10.1f} {min(ts) * 1e3:8.1f} "
              f"{statistics.median(ts) / base:8.2f}x {peak[name] / 1024:17.1f}")
    sent = sum(c[4] for c in calls)
    print(f"collectives per step and rank: {len(calls)}: " + ", ".join(f"{c[0]} {c[1]} {c[2][0]}" for c in calls))
    print(f"bytes sent per step and rank: {sent} ({sent / n:.0f} per row, whatever V; a row of the rank's "
          f"logits slice is {(v + 1) // 2 * 4} bytes)")
    return times, peak, calls


def test_smoke():
    """CI's smoke run (pytest benchmarks --benchmark-disable): a small shape, one round."""
    _, _, calls = main(["--rows", "64", "--vocab", "1000", "--rounds", "1"])
    assert [c[1] for c in calls] == ["MAX", "SUM"]


def test_smoke_sparse():
    _, _, calls = main(["--rows", "64", "--vocab", "1000", "--rounds", "1", "--teacher-k", "8"])
    assert [(c[1], c[2]) for c in calls] == [("MAX", [(64, 2)]), ("SUM", [(64, 8 + 4)])]


if __name__ == "__main__":
    main()
