"""What every trainer shares: data in, resumable sampling, autocast, seeds, checkpoints,
DistributedDataParallel and the evaluation metrics. No training logic lives here."""
from __future__ import annotations

import contextlib
import itertools
import math
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

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# -- argument checks -------------------------------------------------------------------------
def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_unit(name: str, value, *, open_right: bool = False) -> float:
    """A float in [0, 1] (or [0, 1) with ``open_right``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (open_right and value == 1.0):
        raise ValueError(f"{name} must be a number in [0, 1{')' if open_right else ']'}, got {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


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


def as_labels(y: Tensor, name: str) -> Tensor:
    """Integer class labels as int64 (cross-entropy's dtype); int32 and the like are accepted."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} labels must be integer class indices, got {y.dtype}")
    return y.long()


class _WithPosition(Dataset):
    """(dataset[i], i): each sample's position, the index per-sample state (FlexMatch) needs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i], i


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
    by (seed, epoch): reading data never consumes the global random state.
    """

    def __init__(self, data, name: str, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        if isinstance(data, DataLoader) and data.batch_size is not None:
            batch_size = data.batch_size
        check_int("batch_size", batch_size, 1)
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
        self.loader = DataLoader(_WithPosition(self.dataset), batch_size=batch_size, sampler=self.sampler,
                                 drop_last=drop_last, collate_fn=_CollateWithPosition(self.collate),
                                 generator=self._loader_generator, **extra)
        self.batch_size = batch_size
        self.epoch, self.offset, self._it = 0, 0, None
        if len(self) == 0:
            raise ValueError(f"{name} has {len(self.dataset)} samples, fewer than one batch of {batch_size}")

    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        n = len(self.sampler.base)
        return n // self.batch_size if self.loader.drop_last else -(-n // self.batch_size)

    def first(self):
        """The dataset's first sample as a batch of one, split into (x, y or None)."""
        return split_batch(self.collate([self.dataset[0]]), self.name)

    def _start(self):
        self.sampler.base.set_epoch(self.epoch)
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
        return split_batch(batch, self.name), positions

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
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


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, amp: Optional[str] = None, batch_size: int = 512) -> dict:
    """Accuracy, macro recall and macro F1 (torchmetrics) of ``model`` on labeled ``data``.

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
        for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate):
            x, y = split_batch(batch, "data")
            if y is None:
                raise ValueError("evaluate needs labeled data: (x, y) tensors or a Dataset of (x, y[, index])")
            x, y = x.to(device, non_blocking=True), as_labels(y, "data").to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            if metrics is None:
                classes = logits.shape[-1]
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


# -- checkpoints -----------------------------------------------------------------------------
def save_atomic(state: dict, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: an interrupt
    leaves the previous checkpoint whole. Only rank 0 writes."""
    if distributed()[0] != 0:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    if distributed()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
