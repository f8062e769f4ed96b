"""The step loop the trainers share: progress bar, periodic evaluation, checkpoints and
resume. A trainer supplies ``_train_step() -> {term: 0-d tensor}`` and its extra state."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lepton_fast.trainers import _common


def _build_optimizer(optimizer, params):
    if optimizer is None:
        return torch.optim.Adam(params, lr=1e-3)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable(params) -> Optimizer, "
                    f"got {type(optimizer).__name__}")


class Loop:
    """Shared plumbing; see KnowledgeDistiller and CrossDomainTrainer for the arguments."""

    def __init__(self, student: nn.Module, *, optimizer, scheduler, device, amp, seed: int,
                 checkpoint: Optional[str], checkpoint_every: int, progress: bool, log_every: int = 10):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.device = _common.resolve_device(device)
        self.amp = _common.check_amp(amp, self.device)
        self.seed = seed
        _common.seed_everything(seed)
        rank, _ = _common.distributed()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed * 1000 + rank)  # each rank augments its shard differently
        self.student = student.to(self.device)
        self._optimizer_arg, self._scheduler_arg = optimizer, scheduler
        self.optimizer = None
        self.scheduler = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp in ("fp16", "float16"))
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.show_progress, self.log_every = progress, log_every
        self.step = 0
        self.history: dict = {"step": [], "train": [], "validation": []}

    # -- set-up done once the trainable modules are known --------------------------------
    def _build(self, params) -> None:
        if self.optimizer is None:
            self.optimizer = _build_optimizer(self._optimizer_arg, params)
            s = self._scheduler_arg
            self.scheduler = s(self.optimizer) if callable(s) and not hasattr(s, "step") else s

    def _optimize(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    # -- checkpoints ------------------------------------------------------------------------
    def _modules(self) -> dict:
        return {"student": self.student}

    def _streams(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self._modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "streams": {k: s.state_dict() for k, s in self._streams().items()},
            "rng": _common.rng_state(self.generator),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for k, m in self._modules().items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for k, s in self._streams().items():
            s.load_state_dict(state["streams"][k])
        _common.load_rng_state(state["rng"], self.generator)
        self.history = state["history"]

    def save(self, path: Optional[str] = None) -> None:
        """Write a checkpoint atomically (rank 0; the others wait for it)."""
        _common.save_atomic(self.state_dict(), path or self.checkpoint)
        if _common.distributed()[1] > 1:
            dist.barrier()

    def _maybe_resume(self) -> None:
        if self.checkpoint and os.path.exists(self.checkpoint):
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
            try:
                self.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError) as e:
                raise RuntimeError(
                    f"checkpoint {self.checkpoint!r} was written by a trainer with another configuration "
                    f"(model, optimiser, threshold or loss terms), so it cannot resume this one; delete it "
                    f"or pass another checkpoint path. Loading it said: {e}"
                ) from e

    # -- the loop ---------------------------------------------------------------------------
    def _run(self, total_steps: int, desc: str, validation_data, eval_every: int, num_classes: int) -> dict:
        self._maybe_resume()
        bar = _common.progress(total_steps, self.step, desc, self.show_progress)
        sums: dict = {}
        count = 0
        try:
            while self.step < total_steps:
                logs = self._train_step()
                self.step += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                count += 1
                last = self.step == total_steps
                if count == self.log_every or last:
                    means = {k: float(v) / count for k, v in sums.items()}  # one host sync per window
                    means = _common.reduce_mean(means, self.device)
                    self.history["step"].append(self.step)
                    self.history["train"].append(means)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
                    sums, count = {}, 0
                    self._after_window(means)
                bar.update(1)
                if validation_data is not None and eval_every and (self.step % eval_every == 0 or last):
                    scores = self.evaluate(validation_data)
                    self.history["validation"].append({"step": self.step, **scores})
                if self.checkpoint and (self.step % self.checkpoint_every == 0 or last):
                    self.save()
        finally:
            bar.close()
        return self.history

    def _after_window(self, means: dict) -> None:
        pass

    def _num_classes(self) -> int:
        raise NotImplementedError

    def evaluate(self, data, batch_size: int = 512) -> dict:
        """Accuracy, macro recall and macro F1 of the student on ``data`` (tensors (x, y), a
        Dataset or a DataLoader), from torchmetrics; reduced across ranks under DDP."""
        return _common.evaluate(self.student, data, self._num_classes(), self.device, self.amp, batch_size)


def epochs_to_steps(epochs, batches_per_epoch: int) -> int:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    return epochs * batches_per_epoch


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


