"""lepton_fast.demo_sentiment: the teacher's calibration and the product of experts."""
import pytest
import torch
from torch import nn

from lepton_fast.demo_sentiment import ProductOfExperts, fit_temperature


def test_fit_temperature_recovers_the_temperature_of_the_labels():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, 3, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(true * 3.0, labels) == pytest.approx(3.0, rel=0.1)   # overconfident by 3
    assert fit_temperature(true * 0.5, labels) == pytest.approx(0.5, rel=0.1)   # underconfident by 2
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(true, labels[:10])


class _Const(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_product_of_experts_adds_weighted_tempered_log_probabilities():
    a, b = _Const([2.0, 0.0]), _Const([0.0, 1.0])
    poe = ProductOfExperts([a, b], weights=[1.0, 0.5], temperatures=[1.0, 2.0])
    x = torch.zeros(3, 1)
    expected = torch.log_softmax(a(x), -1) + 0.5 * torch.log_softmax(b(x) / 2.0, -1)
    out = poe(x)
    assert torch.allclose(out, expected) and not out.requires_grad
    poe.train()
    assert not poe.training and not any(p.requires_grad for p in poe.parameters())
    with pytest.raises(TypeError, match="experts"):
        ProductOfExperts([])
    with pytest.raises(ValueError, match="weights"):
        ProductOfExperts([a, b], weights=[1.0])
    with pytest.raises(ValueError, match="temperatures"):
        ProductOfExperts([a], temperatures=[0.0])
