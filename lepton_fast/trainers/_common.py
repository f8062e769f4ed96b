"""What every trainer shares: data in, resumable sampling, autocast, seeds, checkpoints,
DistributedDataParallel and the evaluation metrics. No training logic lives here."""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torch.utils.data.dataloader import default_collate
from torch.utils.data.distributed import DistributedSampler

import lepton_fast
from lepton_fast import _validate

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# -- seeds and ranks -------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's ``t`` [B, ...] (the same shape on each) concatenated in rank order
    [world·B, ...], on every rank; ``t`` itself outside torch.distributed. No autograd."""
    _, world = distributed()
    if world == 1:
        return t
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] outside torch.distributed."""
    _, world = distributed()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# -- data ------------------------------------------------------------------------------------
def as_dataset(data, name: str) -> tuple[Dataset, Callable]:
    """Data in any accepted form → (Dataset, collate_fn).

    Accepted: a tensor ``x`` (unlabeled), a tuple or list of tensors with the same first
    dimension (``(x,)``, ``(x, y)``, ``(x, y, index)``), a map-style Dataset, or a
    DataLoader (its dataset and collate_fn).
    """
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    if isinstance(data, Dataset):
        return data, default_collate
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        sizes = [t.shape[0] if t.dim() else None for t in data]
        if None in sizes or len(set(sizes)) != 1:
            raise ValueError(f"{name}: the tensors must share their first (sample) dimension, got shapes "
                             f"{[tuple(t.shape) for t in data]}")
        return TensorDataset(*data), default_collate
    raise TypeError(f"{name} must be a tensor x, tensors (x, y), a torch Dataset or a DataLoader, "
                    f"got {type(data).__name__}")


def split_batch(batch, name: str) -> tuple[Tensor, Optional[Tensor]]:
    """A collated batch → (x, y or None): ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, index)``
    (a dataset's own index is not read: the trainers index samples by position)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise ValueError(f"each batch of {name} must be x, (x,), (x, y) or (x, y, index), got "
                     f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


class _WithPosition(Dataset):
    """(dataset[i], i): each sample's position, the index per-sample state (FlexMatch) needs.

    In a DataLoader worker each batch first reseeds torch, NumPy and Python's ``random``
    from (``seed``, ``epoch``, the batch's positions): a Dataset that draws random numbers
    then draws the same for a batch whichever worker loads it and whatever that worker
    loaded before, so a resumed run (whose first batch may go to another worker) reads
    exactly what the uninterrupted run read. Without workers the draws come from the main
    process's random state, which the checkpoints hold.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i], i

    def __getitems__(self, positions: list) -> list:
        if torch.utils.data.get_worker_info() is not None:
            key = np.asarray([self.seed, self.epoch, *positions], dtype=np.int64).tobytes()
            seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        many = getattr(self.dataset, "__getitems__", None)
        samples = many(positions) if many is not None else [self.dataset[i] for i in positions]
        return list(zip(samples, positions))


class _CollateWithPosition:
    """Collates the samples with the user's collate_fn and their positions as int64 [B]."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items):
        return self.collate([s for s, _ in items]), torch.tensor([i for _, i in items], dtype=torch.int64)


class _Skip(Sampler):
    """A DistributedSampler that can start an epoch part-way, for exact resumes."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


class Batches:
    """An endless stream of ``(batch, positions)`` over epochs, sharded across ranks, resumable.

    ``positions`` int64 [B] are the samples' positions in the dataset. Epoch e's order is
    a permutation drawn from (seed, e) by DistributedSampler (world size 1 outside
    torch.distributed), so ``position`` (epoch, batch offset) alone says where a resumed
    run continues. A DataLoader keeps its batch size, collate_fn and workers; its sampler
    is replaced. The loader draws its workers' seeds from a generator of its own, seeded
    by (seed, epoch): reading data never consumes the global random state; each worker
    reseeds per batch (see ``_WithPosition``). Every batch's floating inputs are checked
    for NaN and ±inf on the host, before they reach the model (ValueError quoting the
    samples' positions).
    """

    def __init__(self, data, name: str, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool,
                 batch_arg: str = "batch_size"):
        # ``batch_arg``: the fit() argument that sets ``batch_size``, named when the data is too small.
        own_batch = isinstance(data, DataLoader) and data.batch_size is not None
        if own_batch:
            batch_size = data.batch_size
        _validate.integer("batch_size", batch_size, 1)
        self.name = name
        self.dataset, self.collate = as_dataset(data, name)
        rank, world = distributed()
        base = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last and world > 1)
        self.sampler = _Skip(base)
        extra = {}
        if isinstance(data, DataLoader):
            extra = {"num_workers": data.num_workers, "pin_memory": data.pin_memory}
        self.seed, self._loader_generator = seed, torch.Generator()
        self._positioned = _WithPosition(self.dataset, seed)
        self.loader = DataLoader(self._positioned, batch_size=batch_size, sampler=self.sampler,
                                 drop_last=drop_last, collate_fn=_CollateWithPosition(self.collate),
                                 generator=self._loader_generator, **extra)
        self.batch_size = batch_size
        self.epoch, self.offset, self._it = 0, 0, None
        if len(self) == 0:
            where = f"{name}'s DataLoader" if own_batch else f"fit(..., {batch_arg}=)"
            raise ValueError(f"{name} has {len(self.dataset)} samples, fewer than one batch of {batch_size}: "
                             f"pass a smaller batch size ({where})")

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        n = len(self.sampler.base)
        return n // self.batch_size if self.loader.drop_last else -(-n // self.batch_size)

    def first(self):
        """The dataset's first sample as a batch of one, split into (x, y or None)."""
        return split_batch(self.collate([self.dataset[0]]), self.name)

    def _start(self):
        self.sampler.base.set_epoch(self.epoch)
        self._positioned.epoch = self.epoch
        self._loader_generator.manual_seed(self.seed * 100_003 + self.epoch)
        self.sampler.skip = self.offset * self.batch_size
        self._it = iter(self.loader)

    def next(self):
        """The next ``((x, y or None), positions)``."""
        if self._it is None:
            self._start()
        try:
            batch, positions = next(self._it)
        except StopIteration:
            self.epoch, self.offset = self.epoch + 1, 0
            self._start()
            batch, positions = next(self._it)
        self.offset += 1
        x, y = split_batch(batch, self.name)
        _validate.finite("x", x, f"{self.name} batch {self.offset} of epoch {self.epoch}", positions)
        return (x, y), positions

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "batch_size": self.batch_size,
                "samples": len(self.dataset), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; a position counted in batches of another size, in a data set
        of another size or in an order shuffled with another seed would resume at another
        sample: ValueError."""
        for key, mine, differ, fix in (
                ("batch_size", self.batch_size, "batches hold {} samples and this run's {}", "batch_size={}"),
                ("samples", len(self.dataset), "data has {} samples and this run's {}", f"the same {self.name} data"),
                ("seed", self.seed, "order was shuffled with seed {} and this run's with seed {}", "seed={}")):
            saved = state.get(key, mine)  # checkpoints written before 2026-12-07 hold no seed
            if saved != mine:
                raise ValueError(f"the checkpoint's {self.name} {differ.format(saved, mine)}, so it would resume at "
                                 f"another sample: resume with {fix.format(saved)}")
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset"]), None


# -- numerics --------------------------------------------------------------------------------
def autocast(device: torch.device, amp: Optional[str]):
    """torch.autocast for ``amp`` in {None, "bf16", "fp16"} (fp16 only on CUDA)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def check_amp(amp: Optional[str], device: torch.device) -> Optional[str]:
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if AMP_DTYPES[amp] is torch.float16 and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' on CPU")
    return amp


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def eval_mode_forward(model: nn.Module, x: Tensor) -> Tensor:
    """model(x) in eval mode without a graph; the model's mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


def probe(model: nn.Module, x: Tensor, name: str, who: str, amp: Optional[str]) -> Tensor:
    """``eval_mode_forward(model, x)`` on the first sample of the data ``name``, where a
    dtype that the model cannot take gets an error naming the data and the fix."""
    _validate.inputs_for(name, x, model, amp is not None)
    try:
        with autocast(x.device, amp):
            return eval_mode_forward(model, x)
    except RuntimeError as e:
        if x.is_floating_point():
            # The model's own error (a width it does not take, say), unchanged: its shapes are
            # the model's to state, but the traceback should say which data it was given.
            e.add_note(f"(the {who}'s forward on the first sample of {name}, of shape {tuple(x.shape[1:])}, "
                       f"before the first step)")
            raise
        raise TypeError(f"{name} inputs are {x.dtype} and the {who} fails on them ({e}). Integer inputs suit a "
                        f"model that embeds them (token ids); for features or images pass x.float()") from e


def first_labels(name: str, y: Tensor, classes: int, ignore_index: Optional[int] = None) -> None:
    """The first sample's label ``y`` (a batch of one), before the first step: one class index
    per sample, in [0, ``classes``) or ``ignore_index`` (each step checks its batch's range
    too). Raises TypeError / ValueError naming the data ``name``."""
    if y.dim() != 1:
        raise ValueError(f"{name}: each sample's label must be one class index, but the first sample's label has "
                         f"shape {tuple(y.shape[1:])}")
    _validate.class_indices(name, y, classes, ignore_index)


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, amp: Optional[str] = None, batch_size: int = 512) -> dict:
    """Accuracy, macro recall and macro F1 (torchmetrics) of ``model`` on labeled ``data``.

    Raises ValueError for inputs or logits holding NaN or ±inf (quoting the samples'
    positions) and for labels outside the model's classes: a score of such data means nothing.

    The class count is the model's (its logits' last dimension), so a model can be
    scored before any training. Under torch.distributed every rank scores its shard and
    torchmetrics sums the states across ranks (DistributedSampler repeats up to
    world_size - 1 samples to even out the shards). The model's train/eval mode is restored.
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

    dataset, collate = as_dataset(data, "data")
    rank, world = distributed()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    metrics = None
    was_training = model.training
    model.eval()
    try:
        for batch, positions in DataLoader(_WithPosition(dataset), batch_size=batch_size, sampler=sampler,
                                           collate_fn=_CollateWithPosition(collate)):
            x, y = split_batch(batch, "data")
            if y is None:
                raise ValueError("evaluate needs labeled data: (x, y) tensors or a Dataset of (x, y[, index])")
            _validate.finite("x", x, "evaluate: data", positions)
            x = x.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            classes = logits.shape[-1]
            _validate.finite("the model's logits", logits, "evaluate", positions.to(logits.device))
            y = _validate.class_indices("data", y.to(device, non_blocking=True), classes)
            if metrics is None:
                metrics = {
                    "accuracy": MulticlassAccuracy(classes, average="micro"),
                    "macro_recall": MulticlassRecall(classes, average="macro"),
                    "macro_f1": MulticlassF1Score(classes, average="macro"),
                }
                metrics = {k: m.to(device) for k, m in metrics.items()}
            predictions = logits.argmax(-1)
            for m in metrics.values():
                m.update(predictions, y)
    finally:
        model.train(was_training)
    if metrics is None:
        raise ValueError("evaluate got empty data")
    return {k: float(m.compute()) for k, m in metrics.items()}


def reduce_mean(values: dict, device: torch.device) -> dict:
    """Average scalar floats over ranks (one all_reduce); unchanged outside DDP."""
    _, world = distributed()
    if world == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def select(logits: Tensor, threshold_kwargs: dict):
    """``lepton_fast.select_pseudo_labels`` of ``logits`` under a threshold's ``loss_kwargs``
    (SoftMatch's per-row ``weights`` weigh a loss, not the selection: left out)."""
    return lepton_fast.select_pseudo_labels(logits, **{k: v for k, v in threshold_kwargs.items() if k != "weights"})


# -- checkpoints -----------------------------------------------------------------------------
# A checkpoint file is _MAGIC, the SHA-256 of the payload, then the payload (torch.save of
# the trainer's state_dict()). The digest is checked before anything is unpickled: torch.save's
# zip container does not check its stored tensors, so a flipped bit in the weights would
# otherwise resume silently.
_MAGIC = b"lepton_fast checkpoint 1\n"
_DIGEST = 32
_START_OVER = ("delete it (or pass another checkpoint= path) to start the run over, or put back a good copy "
               "to resume from it")


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` durably; only rank 0 writes.

    The bytes go to ``<path>.tmp<pid>`` in the same folder, are flushed and fsync'ed, and
    replace ``path`` in one os.replace, whose directory entry is fsync'ed too: a crash or a
    kill at any moment leaves the previous checkpoint whole, and a power loss after the
    return keeps the new one. Temporary files of writers that were killed (their process is
    gone) are removed first; a failing write removes its own.
    """
    if distributed()[0] != 0:
        return
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if os.name == "posix":  # the rename itself survives a power loss once its directory is synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temporaries(path: str) -> None:
    """Remove ``<path>.tmp<pid>`` files whose writer process no longer exists."""
    folder, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(folder):
        pid = name[len(base) + 4:]
        if not (name.startswith(base + ".tmp") and pid.isdigit()) or int(pid) == os.getpid():
            continue
        if not _process_exists(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def _process_exists(pid: int) -> bool:
    if os.name != "posix":  # no side-effect-free probe: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_checkpoint(path: str, map_location=None) -> dict:
    """The state that ``save_checkpoint`` wrote to ``path``, after checking its digest.

    Raises RuntimeError naming ``path`` and what to do for an empty, truncated, corrupted
    (digest mismatch) or foreign file, before anything in it is unpickled.
    """
    with open(path, "rb") as f:
        data = f.read()
    head = len(_MAGIC) + _DIGEST
    why = None
    if not data:
        why = "it is empty (a copy or a write that never finished?)"
    elif not data.startswith(_MAGIC) or len(data) < head:
        why = ("it is not a lepton_fast trainer checkpoint (another file, one cut short, or one written before "
               "checkpoints carried a checksum)")
    else:
        payload = memoryview(data)[head:]
        if hashlib.sha256(payload).digest() != data[len(_MAGIC):head]:
            why = (f"its checksum does not match its {len(payload)} bytes of content: it was cut short or "
                   f"corrupted after it was written")
    if why is not None:
        raise RuntimeError(f"checkpoint {path!r} cannot be read: {why}. To go on, {_START_OVER}")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def rng_state(generator: torch.Generator) -> dict:
    """This process's random state: torch (CPU and CUDA), the trainer's generator, Python, NumPy."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or distributed()[0] != 0,
                dynamic_ncols=True, leave=False)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel under torch.distributed (else as it is), with its
    buffers synchronised by :func:`sync_buffers` rather than by DDP at each forward.

    DDP's default copies rank 0's buffers into the module's at the start of every forward, in
    place. A step with a second forward before its backward (the adversarial term's pass over
    the perturbed batch) then overwrites the BatchNorm running statistics that the first
    forward's graph saved, and on torch 2.11 the backward fails ("modified by an inplace
    operation"). The same copy once after each optimiser step, and once here, gives every
    forward the same buffers on every rank, and leaves them the same on every rank whenever a
    checkpoint is written."""
    if distributed()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    net = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    sync_buffers(net)
    return net


def sync_buffers(net: nn.Module) -> None:
    """Rank 0's buffers into every rank's, one broadcast per dtype, as DDP's own
    broadcast_buffers does; nothing outside DDP."""
    if not isinstance(net, nn.parallel.DistributedDataParallel):
        return
    by_dtype: dict = {}
    for b in net.module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, 0)
            for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(value.view_as(b))
