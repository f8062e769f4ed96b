"""What a demo task supplies (:class:`Task`) and the rows every task has.

Every task has the same rows, all scored on the target's held-out test set:

1. source-only teacher: the model trained on the labeled source alone.
2. target-supervised (bound): the teacher fine-tuned on the labeled adaptation set (the
   only row that reads target labels).
3. student + KD: source labels plus distillation from the teacher on target inputs.
4.–6. the student with one other term instead of KD: pseudo-labels (FixMatch with
   distribution alignment and FlexMatch thresholds), domain-adversarial (DANN),
   adversarial samples.
7. all together: KD + pseudo-labels + domain-adversarial + adversarial samples.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

TEACHER, UPPER = "source-only teacher", "target-supervised (bound)"
ADAPTED = ("student + KD", "+ pseudo-labels", "+ domain-adversarial", "+ adversarial samples", "all together")
ROW_TERMS = dict(zip(ADAPTED, [("kd",), ("pseudo",), ("domain",), ("adversarial",),
                               ("kd", "pseudo", "domain", "adversarial")]))
ROWS = (TEACHER, UPPER) + ADAPTED


class Data(NamedTuple):
    source: object  # labeled source data (any form the trainers take)
    adapt: object   # target adaptation set: unlabeled for the adapted rows, labeled for the bound
    test: object    # labeled target test set, for evaluation only


@dataclass(frozen=True)
class Task:
    """What a demo task supplies; the runner (:mod:`lepton_fast.tasks.runner`) does the rest
    (seeds, processes, table, JSON, plot).

    ``load(progress)`` returns the task's :class:`Data` (or a NamedTuple with those fields
    first); it raises :class:`lepton_fast.tasks.DataUnavailable` when the data cannot be had.
    ``trainer_kwargs(row, data)`` returns the CrossDomainTrainer keyword arguments of a row
    (views, threshold, weights, feature split, ...) other than ``terms``, ``optimizer``,
    ``device``, ``amp``, ``seed`` and ``progress``; a "kd" row's ``teacher`` defaults to a
    copy of the source-only teacher (give another one, e.g. a rule-based model, here).
    ``cost`` ranks the rows by run time so that the longest start first.

    ``optimizer(lr)`` gives the trainers' optimizer factory ``params -> Optimizer`` (default
    Adam). ``kd_teacher(teacher, data)``, if given, builds the "kd" rows' teacher from a copy
    of the trained source-only teacher (e.g. an ensemble with a rule-based model).
    ``fresh_students``: the adapted rows start from a new, seeded model instead of the
    teacher's weights (the bound always starts from the teacher).
    """

    name: str
    title: str                  # the plot's title, e.g. "MNIST → scikit-learn digits"
    test_set: str               # the table's first line, e.g. "719 scikit-learn digits"
    load: Callable[[bool], Data]   # load(progress): progress shows a download's bar
    model: Callable[[], nn.Module]
    trainer_kwargs: Callable[[str, Data], dict]
    source_steps: int           # the teacher's
    adapt_steps: int            # the bound's and each adapted row's
    batch_size: int
    eval_every: int
    teacher_lr: float
    adapt_lr: float             # adapted rows (the bound trains at teacher_lr)
    cost: dict = field(default_factory=dict)
    optimizer: Callable[[float], Callable] = lambda lr: functools.partial(torch.optim.Adam, lr=lr)
    kd_teacher: Optional[Callable[[nn.Module, object], nn.Module]] = None
    fresh_students: bool = False


__all__ = ["ADAPTED", "Data", "ROWS", "ROW_TERMS", "TEACHER", "Task", "UPPER"]
