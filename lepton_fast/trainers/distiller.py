"""KnowledgeDistiller: a student learns from labels and a frozen teacher with fused_kd_loss."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lepton_fast import _validate
from lepton_fast.ops.kd_loss import DIVERGENCES, fused_kd_loss
from lepton_fast.trainers import _common
from lepton_fast.trainers._loop import Loop, epochs_to_steps


def probe_classes(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> int:
    """Run both on one sample; their class counts must agree (else ValueError)."""
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    with torch.no_grad():
        c_t, c_s = teacher(x[:1]).shape[-1], student(x[:1]).shape[-1]
    teacher.train(was[0]), student.train(was[1])
    if c_t != c_s:
        raise ValueError(f"teacher predicts {c_t} classes but student predicts {c_s}; distillation needs the same classes")
    return c_s


class KnowledgeDistiller(Loop):
    """Distil a frozen ``teacher`` into ``student`` (Hinton, Vinyals & Dean 2015).

    Each step minimises ``fused_kd_loss(student(x), teacher(x), temperature, labels=y,
    alpha=alpha)`` = α·CE(student, y) + (1 − α)·T²·KL(p_teacher ‖ p_student).

    Args:
        teacher, student: nn.Modules mapping x [N, ...] to logits [N, C] (same C). The
            teacher is put in eval mode and never updated.
        temperature: T > 0 (default 4).
        alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.5; 0 = pure KD).
        optimizer: a torch.optim.Optimizer over the student's parameters, or a callable
            ``params -> Optimizer``; default Adam(lr=1e-3).
        scheduler: an LR scheduler, or a callable ``optimizer -> scheduler``; stepped once
            per optimiser step.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (see fused_kd_loss).
        device: default CUDA if available, else CPU. amp: None, ``"bf16"`` (CPU or CUDA) or
            ``"fp16"`` (CUDA, with a GradScaler) for torch.autocast.
        seed: seeds torch/NumPy/Python, the data order and the augmentation generator.
        checkpoint: a file path; written atomically every ``checkpoint_every`` steps and at
            the end, and read by ``fit`` to resume where an interrupted run stopped.
        progress: a tqdm bar with the running loss (rank 0 only).

    Under ``torchrun`` (torch.distributed initialised before construction) the student is
    wrapped in DistributedDataParallel, each rank reads its DistributedSampler shard, and
    logged losses and metrics are averaged across ranks.

    Raises:
        TypeError: teacher/student not nn.Modules, bad optimizer or data types.
        ValueError: temperature ≤ 0, alpha outside [0, 1], unknown divergence or amp,
            teacher and student with different class counts (found at the start of fit).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5,
                 optimizer=None, scheduler=None, divergence: str = "forward_kl", device=None,
                 amp: Optional[str] = None, seed: int = 0, checkpoint: Optional[str] = None,
                 checkpoint_every: int = 100, progress: bool = True):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.temperature = _validate.positive_finite("temperature", temperature)
        self.alpha = _validate.in_unit_interval("alpha", alpha)
        self.divergence = _validate.choice("divergence", divergence, DIVERGENCES)
        super().__init__(student, optimizer=optimizer, scheduler=scheduler, device=device, amp=amp, seed=seed,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress)
        self.teacher = teacher.to(self.device).eval()
        self._build(self.student.parameters())
        self.net = _common.wrap_ddp(self.student, self.device)
        self.classes: Optional[int] = None
        self._data = None

    def _streams(self) -> dict:
        return {"train": self._data} if self._data is not None else {}

    def _num_classes(self) -> int:
        if self.classes is None:
            raise RuntimeError("call fit first, or evaluate after the class count is known")
        return self.classes

    def _train_step(self) -> dict:
        x, y, _ = _common.unpack(self._data.next())
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.no_grad(), _common.autocast(self.device, self.amp):
            teacher_logits = self.teacher(x)
        with _common.autocast(self.device, self.amp):
            student_logits = self.net(x)
        loss = fused_kd_loss(student_logits, teacher_logits, self.temperature, labels=y, alpha=self.alpha,
                             divergence=self.divergence)
        self._optimize(loss)
        return {"loss": loss}

    def fit(self, train_data, *, epochs: int = 1, batch_size: int = 64, validation_data=None) -> dict:
        """Train for ``epochs`` passes over ``train_data`` (tensors (x, y), a Dataset of
        (x, y[, index]) or a DataLoader). Returns the history: ``step``, ``train`` (mean
        loss per logging window) and ``validation`` (metrics after each epoch)."""
        self._data = _common.Batches(train_data, "train_data", batch_size, shuffle=True, seed=self.seed,
                                     drop_last=False)
        x0, _, _ = _common.unpack(self._data.dataset[0])
        self.classes = probe_classes(self.teacher, self.student, x0.unsqueeze(0).to(self.device))
        total = epochs_to_steps(epochs, len(self._data))
        return self._run(total, "distil", validation_data, len(self._data), self.classes)
