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


def _fake_corpora(cache):
    """Unpacked corpora in the cache, as fetch_corpora leaves them, with made-up snippets."""
    from lepton_fast.data import sentiment as S

    folder = S.cache_dir(cache) / f"{S.PACKAGE}-{S.VERSION}"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    words = {1: ["great", "good", "love"], 0: ["bad", "awful", "broke"]}

    def corpus(n, topic):
        lines = []
        for i in range(n):
            label = i % 2
            w = words[label][int(torch.randint(3, (1,), generator=g))]
            lines.append(f"{i}\t{2.0 if label else -2.0}\t{topic} {i % 7} was {w}\n")
        return "".join(lines)

    for name in S.CORPORA.values():
        (folder / name).write_text("")
    (folder / S.CORPORA["movie"]).write_text(corpus(400, "the movie"))
    (folder / S.CORPORA["amazon"]).write_text(corpus(300, "the player"))
    (folder / S.LEXICON_FILE).write_text("good\t1.9\t0.9\t[2]\nbad\t-2.5\t0.5\t[-2]\n")
    (folder / S._DONE).write_text("made by the test\n")


def test_demo_task_sentiment_quick_end_to_end(tmp_path, monkeypatch, capsys):
    import json

    pytest.importorskip("matplotlib")
    from lepton_fast import demo, demo_sentiment
    from lepton_fast.__main__ import main

    if "fresh_students" not in getattr(getattr(demo, "Task", None), "__dataclass_fields__", {}):
        pytest.skip("demo.py has no --task structure with the sentiment hooks yet (trainers branch)")

    monkeypatch.setenv("LEPTON_FAST_CACHE", str(tmp_path / "cache"))  # the spawned rows inherit it
    _fake_corpora(tmp_path / "cache")
    demo._data.cache_clear(), demo_sentiment.load.cache_clear()
    try:
        out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
        assert main(["demo", "--task", "sentiment", "--quick", "--no-progress", "--jobs", "2", "--json",
                     str(out_json), "--plot", str(out_png)]) == 0
    finally:
        demo._data.cache_clear(), demo_sentiment.load.cache_clear()
    printed = capsys.readouterr().out
    assert "target test set: 1,177 Amazon review snippets" in printed
    result = json.loads(out_json.read_text())
    assert result["task"] == "sentiment" and list(result["table"]) == list(demo.ROWS)
    assert out_png.stat().st_size > 0
    rows = result["per_seed"][0]
    assert rows[demo.UPPER]["from_teacher"] and not rows["student + KD"]["from_teacher"]
