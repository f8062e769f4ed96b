"""GPU timing cases that benchmarks/gpu_check.py runs: one module per op.

Each module defines ``cases(device) -> list[Case]``. A case names the shape, the minimum
bytes any implementation must move (so that gpu_check.py can report achieved GB/s as a
fraction of the measured copy bandwidth) and one zero-argument callable per variant that
runs the timed work once (for example forward+backward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Case:
    name: str  # "<op> <shape> <dtype> <fwd|fwd+bwd>"
    min_bytes: int
    variants: dict[str, Callable[[], object]] = field(default_factory=dict)
