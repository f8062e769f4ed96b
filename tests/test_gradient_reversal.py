"""GradientReversal's current weight reads as a number (the module's schedule itself is
tested with the op in test_grad_reverse.py)."""
import math

import pytest
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


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lambda_="1"), TypeError, r"lambda_ must be a real number, got str '1'"),
    (dict(lambda_=True), TypeError, "lambda_ must be a real number"),
    (dict(lambda_=math.nan), ValueError, "lambda_ must be a finite number"),
    (dict(total_steps=10, lo="0"), TypeError, "lo must be a real number"),
    (dict(total_steps=10, hi=math.inf), ValueError, "hi must be a finite number"),
    (dict(total_steps=10, gamma=0.0), ValueError, r"gamma must be a finite number in \(0, inf\), got 0.0"),
    (dict(total_steps=10.0), TypeError, "total_steps must be an int"),
    (dict(total_steps=True), TypeError, "total_steps must be an int"),
    (dict(lambda_=torch.tensor(0.5, requires_grad=True)), ValueError, "lambda_ is a fixed setting.*requires grad"),
])
def test_settings_are_checked_and_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientReversal(**kwargs)


def test_number_like_settings_are_accepted():
    import numpy as np

    assert GradientReversal(np.float32(0.5)).fixed_lambda == 0.5
    assert GradientReversal(torch.tensor(2.0)).fixed_lambda == 2.0
    assert GradientReversal(total_steps=np.int64(4)).total_steps == 4
