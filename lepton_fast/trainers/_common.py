"""What every trainer shares: data in, resumable sampling, autocast, seeds, checkpoints,
DistributedDataParallel and the evaluation metrics. No training logic lives here."""
from __future__ import annotations

import contextlib
import itertools
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from lepton_fast.data import IndexedTensorDataset

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


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


def as_dataset(data, name: str) -> Dataset:
    """Tensors ``(x, y)``, a Dataset or a DataLoader (its dataset) → a Dataset."""
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return IndexedTensorDataset(*data)
    raise TypeError(f"{name} must be tensors (x, y), a torch Dataset or a DataLoader, got {type(data).__name__}")


def unpack(batch):
    """A batch of (x, y) or (x, y, index) → (x, y, index or None)."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise ValueError("each batch must be (x, y) or (x, y, index)")


class _Skip(Sampler):
    """A DistributedSampler that can start an epoch part-way, for exact resumes."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


class Batches:
    """An endless stream of batches over epochs, sharded across ranks, resumable.

    Epoch e's order is a permutation drawn from (seed, e) by DistributedSampler (world
    size 1 outside torch.distributed), so ``position`` (epoch, batch offset) alone says
    where a resumed run continues. A DataLoader keeps its batch size, collate_fn and
    workers; its sampler is replaced.
    """

    def __init__(self, data, name: str, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        if isinstance(data, DataLoader) and data.batch_size is not None:
            batch_size = data.batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.dataset = as_dataset(data, name)
        rank, world = distributed()
        base = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last and world > 1)
        self.sampler = _Skip(base)
        extra = {}
        if isinstance(data, DataLoader):
            extra = {"collate_fn": data.collate_fn, "num_workers": data.num_workers, "pin_memory": data.pin_memory}
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                 **extra)
        self.batch_size = batch_size
        self.epoch, self.offset, self._it = 0, 0, None
        if len(self.loader) == 0:
            raise ValueError(f"{name} has {len(self.dataset)} samples, fewer than one batch of {batch_size}")

    def __len__(self) -> int:
        return len(self.sampler.base) // self.batch_size if self.loader.drop_last else -(-len(self.sampler.base) // self.batch_size)

    def _start(self):
        self.sampler.base.set_epoch(self.epoch)
        self.sampler.skip = self.offset * self.batch_size
        self._it = iter(self.loader)

    def next(self):
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.offset = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        self.offset += 1
        return batch

    def epoch_end(self) -> bool:
        return self.offset >= len(self)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset"]), None


def eval_loader(data, batch_size: int) -> DataLoader:
    dataset = as_dataset(data, "data")
    rank, world = distributed()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


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


@torch.no_grad()
def evaluate(model: nn.Module, data, num_classes: int, device: torch.device, amp: Optional[str] = None,
             batch_size: int = 512) -> dict:
    """Accuracy, macro recall and macro F1 (torchmetrics) of ``model`` on ``data``.

    Under torch.distributed every rank scores its shard and torchmetrics sums the states
    across ranks (DistributedSampler repeats up to world_size - 1 samples to even out
    the shards). The model's train/eval mode is restored.
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

    metrics = {
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "macro_recall": MulticlassRecall(num_classes, average="macro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
    }
    metrics = {k: m.to(device) for k, m in metrics.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in eval_loader(data, batch_size):
            x, y, _ = unpack(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            predictions = logits.argmax(-1)
            for m in metrics.values():
                m.update(predictions, y)
    finally:
        model.train(was_training)
    return {k: float(m.compute()) for k, m in metrics.items()}


def reduce_mean(values: dict, device: torch.device) -> dict:
    """Average scalar floats over ranks (one all_reduce); unchanged outside DDP."""
    _, world = distributed()
    if world == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


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
