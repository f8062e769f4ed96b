"""A pool of spawned processes joined in one gloo process group, for tests of collectives.

Starting processes and a process group costs seconds, so one pool serves every case of a
test module: ``pool.run(fn, *args)`` runs ``fn(ctx, *args)`` on every rank and returns the
ranks' answers in rank order (``fn`` must be a module-level function, so that the workers can
import it). ``ctx`` holds the rank, the world size and the groups made at start-up:
``groups[i]``, the group of ranks 0..sizes[i]-1 (None on the other ranks). An exception on
any rank is raised in the caller with the worker's traceback; a case that does not answer
within ``timeout`` seconds (a rank waiting in a collective the others never join) shuts the
pool down and fails. With ``poison`` (the tests' default) every new buffer is filled with
NaN, as tests/conftest.py does in the test process; benchmarks turn it off.
``CollectiveRecorder`` records the collectives a block of code runs; ``recording_all_reduce``
the all-reduces inside custom ops, which a dispatch mode cannot see.
"""
from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class RankContext:
    rank: int
    world_size: int
    groups: list = field(default_factory=list)  # the group of ranks 0..sizes[i]-1, or None off it
    cache: dict = field(default_factory=dict)  # a place for fn to keep things between cases (meshes)


class WorkerError(RuntimeError):
    def __init__(self, message, failures=()):
        super().__init__(message)
        self.failures = list(failures)  # (rank, exception type name, message)


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective the dispatcher runs (torch.distributed's functions and
    DTensor's all reach it as c10d ops): ``calls`` is a list of (op, reduction or None,
    [tensor shapes], dtype, bytes)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            tensors = [t for t in _flat(args[0]) if isinstance(t, torch.Tensor)]
            reduce_op = next((a for a in args if isinstance(a, torch.ScriptObject) and a._has_method("op")), None)
            how = None if reduce_op is None else dist.ReduceOp.RedOpType(reduce_op.op()).name
            self.calls.append((func.__name__.split(".")[0], how, [tuple(t.shape) for t in tensors],
                               tensors[0].dtype if tensors else None,
                               sum(t.numel() * t.element_size() for t in tensors)))
        return func(*args, **(kwargs or {}))


def _portable(x):
    """x with every tensor detached and copied: what a queue can carry to another process."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_portable(y) for y in x)
    if isinstance(x, dict):
        return {k: _portable(v) for k, v in x.items()}
    return x


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    else:
        yield x


def _worker(rank, world_size, init_file, sizes, poison, tasks, results):
    torch.set_num_threads(1)
    # As tests/conftest.py does: every new buffer comes back filled with NaN, so that an element
    # a kernel forgot to write shows.
    torch.use_deterministic_algorithms(poison, warn_only=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    ctx = RankContext(rank, world_size)
    for k in sizes:
        group = dist.new_group(list(range(k)))  # every rank takes part in making every group
        ctx.groups.append(group if rank < k else None)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, _portable(fn(ctx, *args))))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the test
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, sizes=(), poison=True):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "init")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, tuple(sizes), poison, self._tasks[r],
                                              self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = None

    def run(self, fn, *args, timeout: float = 120):
        """[fn(ctx, *args) on rank 0, on rank 1, ...]; WorkerError if a rank raised."""
        if self.broken:
            raise WorkerError(f"the rank pool is down after an earlier case: {self.broken}")
        for q in self._tasks:
            q.put((fn, args))
        answers, failures = [None] * self.world_size, []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.broken = f"{fn.__name__} did not answer within {timeout} s"
                self.close()
                raise WorkerError(self.broken) from None
            if ok:
                answers[rank] = value
            else:
                failures.append((rank, value))
        if failures:
            failures.sort()
            raise WorkerError("\n".join(f"rank {r}: {name}: {msg}\n{tb}" for r, (name, msg, tb) in failures),
                              [(r, name, msg) for r, (name, msg, _) in failures])
        return answers

    def close(self):
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()


@contextlib.contextmanager
def recording_all_reduce(calls):
    """Appends (reduction, shape) of every dist.all_reduce to ``calls``. CollectiveRecorder (a
    dispatch mode) cannot see into the fused-linear losses: a custom op runs its body below it."""
    real = dist.all_reduce

    def recording(tensor, op=dist.ReduceOp.SUM, **kwargs):
        calls.append(("MAX" if op == dist.ReduceOp.MAX else "SUM" if op == dist.ReduceOp.SUM else op,
                      tuple(tensor.shape)))
        return real(tensor, op=op, **kwargs)

    dist.all_reduce = recording
    try:
        yield
    finally:
        dist.all_reduce = real
