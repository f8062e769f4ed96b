"""The step loop the trainers share: optimiser, progress bar, periodic evaluation,
checkpoints and resume. A trainer supplies ``_train_step() -> {term: 0-d tensor}`` and its
extra state."""
from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from lepton_fast import _validate
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
        return _validate.integer("steps", steps, 1)
    return _validate.integer("epochs", 1 if epochs is None else epochs, 1) * batches_per_epoch


class _StopOnSignal:
    """While a ``fit`` with a checkpoint runs: SIGINT and SIGTERM ask the loop to stop after
    the step under way, save, and then take the signal's usual course (``deliver``).

    Handlers go in on entry and the previous ones come back on exit; a signal whose
    handler is SIG_IGN stays ignored; outside the main thread (where Python allows no
    handlers) nothing changes. A second signal before the save ends restores the previous
    handlers and takes its course at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled, self.received, self._previous = enabled, None, {}

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN and previous is not None:  # None: set outside Python
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """Whether a signal came, on any rank: ranks stop at the same step, to save together."""
        stop = self.received is not None
        if self.enabled and _common.distributed()[1] > 1:
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def deliver(self) -> None:
        """With the previous handlers back: the signal as the process would have taken it
        (KeyboardInterrupt for SIGINT by default, termination for SIGTERM)."""
        if self.received is not None:
            signal.raise_signal(self.received)


def _new_window() -> dict:
    """A logging window: the sums of the logged terms, the step count, and the trainer's own
    tallies for the checks at the window's end (``watch``: {name: tensor})."""
    return {"sums": {}, "count": 0, "watch": {}}


def _types(*objects) -> tuple:
    """The qualified class names of the optimizer and the scheduler (None for no scheduler)."""
    return tuple(None if o is None else f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)


class Loop:
    """Shared plumbing; see KnowledgeDistiller and CrossDomainTrainer for the arguments."""

    def __init__(self, student: nn.Module, *, optimizer, lr, scheduler, device, amp, seed: int,
                 checkpoint: Optional[str], checkpoint_every: int, progress: bool, log_every: int = 10):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        _validate.integer("seed", seed, -2**63)
        _validate.integer("checkpoint_every", checkpoint_every, 1)
        if lr is not None:
            _validate.positive_finite("lr", lr)
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
        self._window = _new_window()  # the logging window under way

    # -- set-up done once the trainable modules are known --------------------------------
    def _build(self, owners: dict) -> None:
        """Build (or check) the optimizer over the parameters of ``owners`` ({name: module})."""
        if self.optimizer is None:
            params = [p for m in owners.values() for p in m.parameters()]
            self.optimizer = build_optimizer(self._optimizer_arg, self._lr, params)
            check_optimizer(self.optimizer, owners)
            s = self._scheduler_arg
            self.scheduler = s(self.optimizer) if callable(s) and not hasattr(s, "step") else s
            if getattr(self.scheduler, "optimizer", self.optimizer) is not self.optimizer:
                raise ValueError("scheduler was built over another optimizer than the trainer's, so stepping it "
                                 "would change no learning rate here: pass a callable optimizer -> scheduler (the "
                                 "trainer builds it over its optimizer), or build it over the optimizer you pass")

    def _watch(self, name: str, value) -> None:
        """Add ``value`` (a tensor) to the window's tally ``name``, which ``_after_window``
        reads; the tallies are checkpointed with the window."""
        watch = self._window["watch"]
        watch[name] = value if name not in watch else watch[name] + value

    def _optimize(self, loss, terms: dict) -> None:
        """One optimiser step on ``loss``, once ``loss`` and its ``terms`` ({name: 0-d
        tensor}) are known to be finite (one host read): a non-finite loss stops training
        with FloatingPointError naming the terms, before it reaches the weights."""
        values = {k: v.detach().float() for k, v in {**terms, "loss": loss}.items()}
        if not bool(torch.isfinite(torch.stack(list(values.values()))).all()):
            bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
            raise FloatingPointError(
                f"the loss is not finite ({', '.join(f'{k}={v}' for k, v in bad.items())}): training stops before "
                f"this step changes the weights, and the last checkpoint is kept. Usual causes: a learning rate "
                f"too high for the data's scale, or weights that diverged; lower lr, or check the inputs")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        _common.sync_buffers(self.net)
        if self.scheduler is not None:
            self.scheduler.step()

    # -- checkpoints ------------------------------------------------------------------------
    def _modules(self) -> dict:
        return {"student": self.student}

    def _streams(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Everything a resume needs. Under torch.distributed call it on every rank: it
        gathers each rank's random state and logging sums (the other state is the same on
        every rank)."""
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self._modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "types": _types(self.optimizer, self.scheduler),
            "scaler": self.scaler.state_dict(),
            "streams": {k: s.state_dict() for k, s in self._streams().items()},
            "rng": _common.gather_objects(_common.rng_state(self.generator)),
            "history": self.history,
            # each rank's own sums (the means are reduced across ranks when a window ends);
            # as floats, which hold the float32 sums exactly
            "window": _common.gather_objects({"sums": {k: float(v) for k, v in self._window["sums"].items()},
                                              "count": self._window["count"],
                                              "watch": {k: v.cpu() for k, v in self._window["watch"].items()}}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``: every rank takes its own random state back."""
        rank, world = _common.distributed()
        if len(state["rng"]) != world:
            raise ValueError(f"the checkpoint was written by {len(state['rng'])} process(es) and this run has "
                             f"{world}: resume with the same number of processes")
        # torch's own load_state_dict takes another optimizer's groups (SGD's into Adam: a KeyError
        # at the first step) and a scheduler absent from the checkpoint would start over
        for what, saved, mine in zip(("optimizer", "scheduler"), state.get("types", ()),
                                     _types(self.optimizer, self.scheduler)):
            if saved != mine:
                raise ValueError(f"the checkpoint's {what} is {saved} and this run's {mine}: resume with the same "
                                 f"{what}")
        for k, s in self._streams().items():  # first: refuses a position in another batch size
            s.load_state_dict(state["streams"][k])
        self.step = int(state["step"])
        for k, m in self._modules().items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _common.load_rng_state(state["rng"][rank], self.generator)
        window = state["window"][rank]
        self.history = state["history"]
        self._window = {**window, "watch": {k: v.to(self.device) for k, v in window["watch"].items()}}

    def save(self, path: Optional[str] = None) -> None:
        """Write a checkpoint durably (rank 0; call on every rank, the others wait for it).

        Raises FloatingPointError, and writes nothing, if a module's state holds NaN or
        ±inf: the last good checkpoint stays the one a resume reads; RuntimeError before
        ``fit`` (a checkpoint holds the data's position, which ``fit`` sets); ValueError
        without a ``path`` or the trainer's ``checkpoint``.
        """
        if self.optimizer is None or not self._streams():
            raise RuntimeError("save() before fit(): a checkpoint holds the optimiser and the data's position, which "
                               "fit() sets up; call fit() first (with checkpoint= it saves as it trains)")
        if path is None and not self.checkpoint:
            raise ValueError("save() needs a path: save(path), or checkpoint= when building the trainer")
        modules = {f"{name}.{key}": t for name, m in self._modules().items() for key, t in m.state_dict().items()
                   if t.is_floating_point()}
        if modules and not bool(torch.stack([torch.isfinite(t).all() for t in modules.values()]).all()):
            bad = [k for k, t in modules.items() if not bool(torch.isfinite(t).all())]
            raise FloatingPointError(f"step {self.step}: {', '.join(bad[:5])} hold NaN or ±inf, so no checkpoint is "
                                     f"written (the last one is kept); the weights diverged")
        state = self.state_dict()
        _common.save_checkpoint(state, path or self.checkpoint)
        if _common.distributed()[1] > 1:
            dist.barrier()

    def _maybe_resume(self) -> bool:
        """Load ``checkpoint`` if it exists; whether it did. A checkpoint that cannot be
        loaded leaves the trainer and its modules as they were: loading stops at the first part
        that does not fit, after the parts before it (the student's weights, the step) were
        replaced, so they are put back from a copy taken first; deleting the file and
        calling ``fit`` again then starts over, as the error says."""
        if not (self.checkpoint and os.path.exists(self.checkpoint)):
            return False
        state = _common.load_checkpoint(self.checkpoint, map_location=self.device)
        # On the CPU: module and optimiser state_dicts hold the live tensors, which loading overwrites.
        before = tree_map(lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v,
                          self.state_dict())
        try:
            self.load_state_dict(state)
        except Exception as e:
            self.load_state_dict(before)
            if not isinstance(e, (RuntimeError, KeyError, ValueError)):
                raise
            raise RuntimeError(
                f"checkpoint {self.checkpoint!r} was written by a trainer with another configuration (model, "
                f"optimiser, scheduler, threshold, loss terms, data, batch size, seed or number of processes), so it "
                f"cannot resume this one; nothing was changed: delete it or pass another checkpoint path. "
                f"Loading it said: {e}"
            ) from e
        return True

    # -- the loop ---------------------------------------------------------------------------
    def _run(self, total_steps: int, desc: str, validation_data, eval_every: int) -> dict:
        """Train to ``total_steps``. Logging windows end at multiples of ``log_every`` (and
        the last step), counted from step 0, so that a resumed run logs what the
        uninterrupted run logs. An error raised by a step says which step it was."""
        if self._maybe_resume():  # say so: a finished checkpoint leaves nothing to train
            desc = f"{desc} (resumed from {self.checkpoint} at step {self.step})"
        elif self.step >= total_steps:
            warnings.warn(f"fit: this trainer has taken {self.step} optimiser steps, and steps (or epochs) count "
                          f"from its first, {total_steps} in all, so there is nothing to train; pass more to go on",
                          RuntimeWarning, stacklevel=3)
        bar = _common.progress(total_steps, self.step, desc, self.show_progress)
        stop = _StopOnSignal(enabled=bool(self.checkpoint))
        try:
            with stop:
                while self.step < total_steps:
                    try:
                        logs = self._train_step()
                    except (ValueError, FloatingPointError) as e:
                        if type(e) not in (ValueError, FloatingPointError):
                            raise
                        raise type(e)(f"training step {self.step + 1}: {e}") from e
                    self.step += 1
                    window = self._window
                    for k, v in logs.items():
                        window["sums"][k] = window["sums"].get(k, 0.0) + v.detach().float()
                    window["count"] += 1
                    last = self.step == total_steps
                    if self.step % self.log_every == 0 or last:
                        count = window["count"]  # one host sync per window
                        means = {k: float(v) / count for k, v in window["sums"].items()}
                        means = _common.reduce_mean(means, self.device)
                        self.history["step"].append(self.step)
                        self.history["train"].append(means)
                        notes = self._after_window(means)
                        bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()}, **notes}, refresh=False)
                        self._window = _new_window()
                    bar.update(1)
                    if validation_data is not None and (self.step % eval_every == 0 or last):
                        scores = self.evaluate(validation_data)
                        self.history["validation"].append({"step": self.step, **scores})
                    saved = bool(self.checkpoint) and (self.step % self.checkpoint_every == 0 or last)
                    if saved:
                        self.save()
                    if stop.requested(self.device):
                        if not saved:
                            self.save()
                        break
        finally:
            bar.close()
        stop.deliver()
        return self.history

    def _after_window(self, means: dict) -> dict:
        """Checks at the end of a logging window (on ``self._window["watch"]``); returns extra
        progress-bar fields."""
        return {}

    def evaluate(self, data, batch_size: int = 512) -> dict:
        """Accuracy, macro recall and macro F1 (torchmetrics) of the student on labeled
        ``data`` (tensors (x, y), a Dataset of (x, y[, index]) or a DataLoader), with as
        many classes as the student predicts; reduced across ranks under DDP. Works before
        ``fit`` (to score a baseline)."""
        return _common.evaluate(self.student, data, self.device, self.amp, batch_size)
