"""The step loop the trainers share: optimiser, progress bar, periodic evaluation,
checkpoints and resume. A trainer supplies ``_train_step() -> {term: 0-d tensor}`` and its
extra state."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lepton_fast.trainers import _common

DEFAULT_LR = 1e-3


def build_optimizer(optimizer, lr: Optional[float], params: list):
    """None → Adam(params, lr) (lr default 1e-3); an Optimizer as is; a callable(params)."""
    if optimizer is None:
        return torch.optim.Adam(params, lr=DEFAULT_LR if lr is None else lr)
    if lr is not None:
        raise ValueError("lr sets the learning rate of the default optimizer (Adam); with your own optimizer, "
                         "give the learning rate to it")
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable(params) -> Optimizer, "
                    f"got {type(optimizer).__name__}")


def check_optimizer(optimizer: torch.optim.Optimizer, owners: dict) -> None:
    """The optimizer must update only the parameters of ``owners`` ({name: module}), at
    least one of each owner's: else training would change nothing, or something else."""
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    known = set()
    for name, module in owners.items():
        ids = {id(p) for p in module.parameters()}
        if ids and not ids & given:
            raise ValueError(f"optimizer does not update any parameter of the {name}, so the {name} would never "
                             f"train; build it over {' and '.join(owners)} parameters, or pass a callable "
                             f"params -> Optimizer (or lr=) and the trainer builds it")
        known |= ids
    if given - known:
        raise ValueError(f"optimizer holds {len(given - known)} parameter(s) that are not the "
                         f"{' or '.join(owners)}'s; the trainer only trains {' and '.join(owners)}")


def steps_for(steps, epochs, batches_per_epoch: int) -> int:
    """``steps`` optimiser steps, or ``epochs`` passes of ``batches_per_epoch``; one epoch by default."""
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is not None:
        return _common.check_int("steps", steps, 1)
    return _common.check_int("epochs", 1 if epochs is None else epochs, 1) * batches_per_epoch


class Loop:
    """Shared plumbing; see KnowledgeDistiller and CrossDomainTrainer for the arguments."""

    def __init__(self, student: nn.Module, *, optimizer, lr, scheduler, device, amp, seed: int,
                 checkpoint: Optional[str], checkpoint_every: int, progress: bool, log_every: int = 10):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        _common.check_int("checkpoint_every", checkpoint_every, 1)
        if lr is not None:
            _common.check_positive("lr", lr)
        self.device = _common.resolve_device(device)
        self.amp = _common.check_amp(amp, self.device)
        self.seed = seed
        _common.seed_everything(seed)
        rank, _ = _common.distributed()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed * 1000 + rank)  # each rank augments its shard differently
        self.student = student.to(self.device)
        self._optimizer_arg, self._lr, self._scheduler_arg = optimizer, lr, scheduler
        if optimizer is not None and lr is not None:
            build_optimizer(optimizer, lr, [])  # raises: lr is for the default optimizer only
        self.optimizer = None
        self.scheduler = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp in ("fp16", "float16"))
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.show_progress, self.log_every = progress, log_every
        self.step = 0
        self.history: dict = {"step": [], "train": [], "validation": []}

    # -- set-up done once the trainable modules are known --------------------------------
    def _build(self, owners: dict) -> None:
        """Build (or check) the optimizer over the parameters of ``owners`` ({name: module})."""
        if self.optimizer is None:
            params = [p for m in owners.values() for p in m.parameters()]
            self.optimizer = build_optimizer(self._optimizer_arg, self._lr, params)
            check_optimizer(self.optimizer, owners)
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
        """Everything a resume needs. Under torch.distributed call it on every rank: it
        gathers each rank's random state (the other state is the same on every rank)."""
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self._modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "streams": {k: s.state_dict() for k, s in self._streams().items()},
            "rng": _common.gather_objects(_common.rng_state(self.generator)),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``: every rank takes its own random state back."""
        rank, world = _common.distributed()
        if len(state["rng"]) != world:
            raise ValueError(f"the checkpoint was written by {len(state['rng'])} process(es) and this run has "
                             f"{world}: resume with the same number of processes")
        self.step = int(state["step"])
        for k, m in self._modules().items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for k, s in self._streams().items():
            s.load_state_dict(state["streams"][k])
        _common.load_rng_state(state["rng"][rank], self.generator)
        self.history = state["history"]

    def save(self, path: Optional[str] = None) -> None:
        """Write a checkpoint atomically (rank 0; call on every rank, the others wait for it)."""
        state = self.state_dict()
        _common.save_atomic(state, path or self.checkpoint)
        if _common.distributed()[1] > 1:
            dist.barrier()

    def _maybe_resume(self) -> bool:
        """Load ``checkpoint`` if it exists; whether it did."""
        if self.checkpoint and os.path.exists(self.checkpoint):
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
            try:
                self.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError) as e:
                raise RuntimeError(
                    f"checkpoint {self.checkpoint!r} was written by a trainer with another configuration "
                    f"(model, optimiser, threshold, loss terms or number of processes), so it cannot resume "
                    f"this one; delete it or pass another checkpoint path. Loading it said: {e}"
                ) from e
            return True
        return False

    # -- the loop ---------------------------------------------------------------------------
    def _run(self, total_steps: int, desc: str, validation_data, eval_every: int) -> dict:
        if self._maybe_resume():  # say so: a finished checkpoint leaves nothing to train
            desc = f"{desc} (resumed from {self.checkpoint} at step {self.step})"
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
                    notes = self._after_window(means)
                    bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()}, **notes}, refresh=False)
                    sums, count = {}, 0
                bar.update(1)
                if validation_data is not None and (self.step % eval_every == 0 or last):
                    scores = self.evaluate(validation_data)
                    self.history["validation"].append({"step": self.step, **scores})
                if self.checkpoint and (self.step % self.checkpoint_every == 0 or last):
                    self.save()
        finally:
            bar.close()
        return self.history

    def _after_window(self, means: dict) -> dict:
        """Checks at the end of a logging window; returns extra progress-bar fields."""
        return {}

    def evaluate(self, data, batch_size: int = 512) -> dict:
        """Accuracy, macro recall and macro F1 (torchmetrics) of the student on labeled
        ``data`` (tensors (x, y), a Dataset of (x, y[, index]) or a DataLoader), with as
        many classes as the student predicts; reduced across ranks under DDP. Works before
        ``fit`` (to score a baseline)."""
        return _common.evaluate(self.student, data, self.device, self.amp, batch_size)
