"""The demo's cross-domain tasks (`lepton-fast demo --task NAME`), one folder each.

- :mod:`~lepton_fast.tasks.digits`: MNIST → scikit-learn digits (a LeNet).
- :mod:`~lepton_fast.tasks.sentiment`: movie → Amazon review snippets (a fastText-style model).
- :mod:`~lepton_fast.tasks.speech`: eSpeak NG voices → the Free Spoken Digit Dataset's
  speakers (a 1-D CNN on MFCC frames).

Each folder holds its data loading, model, views and recipe, and its ``task()`` returns a
:class:`~lepton_fast.tasks.base.Task`; :mod:`~lepton_fast.tasks.runner` runs any of them.
Adding a case is one folder and one line in :data:`TASKS`. The library (ops, trainers,
thresholds, adversarial, distributed) imports nothing from here; the tasks need the
``examples`` extra (``pip install "lepton_fast[examples]"``).
"""
from __future__ import annotations

import importlib

from lepton_fast.tasks._fetch import DataUnavailable
from lepton_fast.tasks.base import Task

#: task name → the module whose ``task()`` builds it (imported only when asked for).
TASKS = {
    "digits": "lepton_fast.tasks.digits",
    "sentiment": "lepton_fast.tasks.sentiment",
    "speech": "lepton_fast.tasks.speech",
}


def get_task(name: str) -> Task:
    """The Task called ``name``; ValueError for a name not in :data:`TASKS`."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return importlib.import_module(TASKS[name]).task()


__all__ = ["DataUnavailable", "TASKS", "Task", "get_task"]
