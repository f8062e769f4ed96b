"""GradientReversal's current weight reads as a number (the module's schedule itself is
tested with the op in test_grad_reverse.py)."""
import math

import torch

from lepton_fast import GradientReversal


def test_lambda_is_a_property_that_reads_as_a_number():
    fixed = GradientReversal(0.25)
    assert float(fixed.lambda_) == 0.25 and fixed.fixed_lambda == 0.25
    scheduled = GradientReversal(total_steps=10)
    for _ in range(5):
        scheduled.step()
    assert float(scheduled.lambda_) == torch.tensor(math.tanh(2.5), dtype=torch.float32).item()  # p = 0.5
    lam = scheduled.lambda_
    assert lam.dim() == 0 and lam.dtype == torch.float32 and lam.device == scheduled.step_count.device
    assert isinstance(GradientReversal.lambda_, property)
