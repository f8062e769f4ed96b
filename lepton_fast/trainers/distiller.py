"""KnowledgeDistiller: a student learns from a frozen teacher (and labels) with fused_kd_loss."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

import lepton_fast
from lepton_fast import _validate
from lepton_fast.trainers import _common
from lepton_fast.trainers._loop import Loop, steps_for

IGNORE_INDEX = -100  # fused_kd_loss's default: rows with this label are left out of the loss


def probe_classes(teacher: nn.Module, student: nn.Module, x: torch.Tensor, name: str, amp) -> int:
    """Run both on the first sample of the data ``name`` (eval mode, no graph); their class
    counts must agree (else ValueError); inputs they cannot take are a TypeError naming the data."""
    c_t = _common.probe(teacher, x, name, "teacher", amp).shape[-1]
    c_s = _common.probe(student, x, name, "student", amp).shape[-1]
    if c_t != c_s:
        raise ValueError(f"teacher predicts {c_t} classes but student predicts {c_s}; distillation needs the "
                         f"same classes")
    return c_s


class KnowledgeDistiller(Loop):
    """Distil a frozen ``teacher`` into ``student`` (Hinton, Vinyals & Dean 2015).

    Each step minimises ``fused_kd_loss(student(x), teacher(x), temperature, labels=y,
    alpha=alpha)`` = α·CE(student, y) + (1 − α)·T²·KL(p_teacher ‖ p_student). With
    ``alpha=0`` labels are not read, so unlabeled data (a tensor ``x``, ``(x,)``, a
    TensorDataset(x)) distils too.

    Args:
        teacher, student: nn.Modules mapping x [N, ...] to logits [N, C] (same C). The
            teacher is put in eval mode and never updated.
        temperature: T > 0, default 1.0 as ``fused_kd_loss``, ``KDLoss`` and
            CrossDomainTrainer (the plain KL of the two predictions; Hinton et al. use
            1–20, soft targets carry more at T > 1).
        alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.5; 0 = pure KD,
            no labels needed). Rows labeled ``-100`` are left out of the loss; a logging
            window in which every label is ``-100`` has a loss of exactly 0 and is warned
            about (RuntimeWarning).
        optimizer: a torch.optim.Optimizer over the student's parameters, or a callable
            ``params -> Optimizer``; default Adam(lr).
        lr: the default optimizer's learning rate (default 1e-3); not with ``optimizer``.
        scheduler: an LR scheduler over the trainer's optimizer, or a callable
            ``optimizer -> scheduler``; stepped once per optimiser step.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (see fused_kd_loss).
        device: default CUDA if available, else CPU. amp: None, ``"bf16"`` (CPU or CUDA) or
            ``"fp16"`` (CUDA, with a GradScaler) for torch.autocast.
        seed: seeds torch/NumPy/Python, the data order and the augmentation generator. The
            same seed gives the same numbers on the same machine, thread count and
            versions; see the README for what may differ across machines.
        checkpoint: a file path; written durably (temporary file, fsync, rename) with a
            checksum every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM
            (after the step under way; the signal then takes its usual course), and read by
            ``fit`` to resume where an interrupted run stopped, with the same history. A
            checkpoint of another batch size, data size, seed, optimizer or scheduler class or
            number of processes is refused (and changes nothing). The optimiser and scheduler resume as saved, learning
            rate included, as their load_state_dict does: an ``lr=`` changed since is not
            applied.
        progress: a tqdm bar with the running loss (rank 0 only).

    Under ``torchrun`` (torch.distributed initialised before construction) the student is
    wrapped in DistributedDataParallel, each rank reads its DistributedSampler shard, and
    logged losses and metrics are averaged across ranks.

    Raises:
        TypeError: teacher/student not nn.Modules, bad optimizer or data types, a setting
            that is not a number (a string, a bool); at the start of ``fit``: inputs of a
            dtype the models cannot take (fp16 data for float32 models outside ``amp``),
            labels that are not integers.
        ValueError: temperature ≤ 0, alpha outside [0, 1], unknown divergence or amp, lr
            with an optimizer, an optimizer over other parameters, a scheduler over another
            optimizer, ``save()`` without a path or ``checkpoint``; at the start of
            ``fit``: teacher and student with different class counts, ``alpha > 0`` with
            unlabeled data, a first sample whose label is not one class in [0, C) or -100;
            during ``fit`` (naming the step): inputs holding NaN or ±inf, labels outside
            [0, C) other than -100.
        FloatingPointError: a non-finite loss (before it reaches the weights), or
            non-finite weights at a checkpoint (nothing is written).
        RuntimeError: an unreadable checkpoint (empty, truncated, corrupted) or one of
            another configuration, naming the file; ``save()`` before ``fit``.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 1.0, alpha: float = 0.5,
                 optimizer=None, lr: Optional[float] = None, scheduler=None, divergence: str = "forward_kl",
                 device=None, amp: Optional[str] = None, seed: int = 0, checkpoint: Optional[str] = None,
                 checkpoint_every: int = 100, progress: bool = True):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.temperature = _validate.positive_finite("temperature", temperature)
        self.alpha = _validate.in_unit_interval("alpha", alpha)
        # The op checks its own arguments (divergence among them): ask it once, on a tiny input.
        lepton_fast.fused_kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), self.temperature, divergence=divergence)
        self.divergence = divergence
        super().__init__(student, optimizer=optimizer, lr=lr, scheduler=scheduler, device=device, amp=amp, seed=seed,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress)
        self.teacher = teacher.to(self.device).eval()
        self._build({"student": self.student})
        self.net = _common.wrap_ddp(self.student, self.device)
        self._data = None
        self.classes: Optional[int] = None
        self._warned = False

    def _streams(self) -> dict:
        return {"train": self._data} if self._data is not None else {}

    def _train_step(self) -> dict:
        (x, y), _ = self._data.next()
        x = x.to(self.device, non_blocking=True)
        labels = None
        if self.alpha > 0:
            labels = _validate.class_indices("train_data", y, self.classes, IGNORE_INDEX).to(self.device,
                                                                                              non_blocking=True)
            self._watch("labeled", (labels != IGNORE_INDEX).sum())
        with torch.no_grad(), _common.autocast(self.device, self.amp):
            teacher_logits = self.teacher(x)
        with _common.autocast(self.device, self.amp):
            student_logits = self.net(x)
        loss = lepton_fast.fused_kd_loss(student_logits, teacher_logits, self.temperature, labels=labels,
                                         alpha=self.alpha, divergence=self.divergence)
        self._optimize(loss, {})
        return {"loss": loss}

    def _after_window(self, means: dict) -> dict:
        labeled = self._window["watch"].get("labeled")
        if labeled is not None and int(labeled) == 0:
            if not self._warned:
                warnings.warn(f"every label of the last {self.log_every} steps is {IGNORE_INDEX} (ignore_index): "
                              f"those rows are left out of the loss, which is exactly 0, and the student does not "
                              f"learn. For unlabeled data use alpha=0 (labels are then not read)",
                              RuntimeWarning, stacklevel=4)  # the caller of fit()
                self._warned = True
            return {"labels": "all ignored"}
        return {}

    @torch.no_grad()
    def generate_pseudo_labels(self, x_unlabeled, threshold=None, *, batch_size: int = 512):
        """The teacher's pseudo-labels for unlabeled inputs, selected by a threshold policy.

        Maps to ``lepton_fast.select_pseudo_labels(teacher(x), **threshold.loss_kwargs(...))``
        (the teacher in eval mode, in batches of ``batch_size``, under this trainer's
        ``amp``): the selection that CrossDomainTrainer's "pseudo" term makes, here from the
        teacher. The threshold's state is read, never updated.

        Args:
            x_unlabeled: inputs [N, ...] as the teacher takes them (a tensor; labels are
                never read).
            threshold: a ``lepton_fast.thresholds`` module (FlexMatch, FreeMatch: their
                current class thresholds), a number in [0, 1] (a fixed threshold), or None
                for CrossDomainTrainer's default ``FixedThreshold(0.95)``.

        Returns ``lepton_fast.PseudoLabels``: ``labels`` int64 [N], ``confidence`` float32
        [N] (the teacher's top probability), ``mask`` bool [N] (selected), on the
        trainer's device.

        Raises:
            TypeError: ``x_unlabeled`` not a tensor, or a threshold of another kind.
            ValueError: an empty or non-finite ``x_unlabeled``, a threshold outside [0, 1].
        """
        from lepton_fast.thresholds import FixedThreshold, PseudoLabelThreshold

        if not isinstance(x_unlabeled, torch.Tensor):
            raise TypeError(f"x_unlabeled must be a tensor of inputs [N, ...], got {type(x_unlabeled).__name__}")
        if x_unlabeled.dim() == 0 or x_unlabeled.shape[0] == 0:
            raise ValueError(f"x_unlabeled must hold at least one input [N, ...], got shape {tuple(x_unlabeled.shape)}")
        if threshold is None or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)):
            threshold = FixedThreshold(0.95 if threshold is None else threshold)
        elif not isinstance(threshold, PseudoLabelThreshold):
            raise TypeError(f"threshold must be a lepton_fast.thresholds module, a number in [0, 1] or None, got "
                            f"{type(threshold).__name__}")
        _validate.integer("batch_size", batch_size, 1)
        _validate.finite("x_unlabeled", x_unlabeled, "generate_pseudo_labels")
        _validate.inputs_for("x_unlabeled", x_unlabeled, self.teacher, self.amp is not None)
        with _common.autocast(self.device, self.amp):
            logits = torch.cat([self.teacher(chunk.to(self.device)).float()
                                for chunk in x_unlabeled.split(batch_size)])
        return _common.select(logits, threshold.to(self.device).loss_kwargs(logits))

    def fit(self, train_data, *, steps: Optional[int] = None, epochs: Optional[int] = None, batch_size: int = 64,
            validation_data=None, eval_every: Optional[int] = None) -> dict:
        """Train for ``steps`` optimiser steps or ``epochs`` passes over ``train_data`` (one
        epoch by default), counted from the trainer's first step: after ``fit(steps=100)``,
        ``fit(steps=150)`` trains 50 more (a RuntimeWarning says when there is none to train).

        Args:
            train_data: (x, y) tensors, a Dataset of (x, y[, index]) or a DataLoader; with
                ``alpha=0`` also unlabeled: a tensor x, (x,), a TensorDataset(x).
            validation_data: labeled data scored every ``eval_every`` steps (default: each
                epoch) and at the end.

        Returns the history: ``step``, ``train`` (mean loss per logging window) and
        ``validation`` (metrics).
        """
        self._data = _common.Batches(train_data, "train_data", batch_size, shuffle=True, seed=self.seed,
                                     drop_last=False)
        total = steps_for(steps, epochs, len(self._data))
        eval_every = len(self._data) if eval_every is None else _validate.integer("eval_every", eval_every, 1)
        x0, y0 = self._data.first()
        if self.alpha > 0 and y0 is None:
            raise ValueError(f"alpha={self.alpha} weights a cross-entropy on labels, but train_data has none: pass "
                             f"alpha=0 to distil unlabeled data")
        self.classes = probe_classes(self.teacher, self.student, x0.to(self.device), "train_data", self.amp)
        if self.alpha > 0:
            _common.first_labels("train_data", y0, self.classes, IGNORE_INDEX)
        return self._run(total, "distil", validation_data, eval_every)
