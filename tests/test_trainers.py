"""Trainers on tiny synthetic data (seconds): round trips, each loss term, generic data
(features, token ids, unlabeled sets), the checks at fit() start, resume, reproducibility,
DDP and bad arguments. The demo's pipeline is in test_cli.py."""
import ast
import inspect
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lepton_fast
from lepton_fast import thresholds
from lepton_fast.trainers import TERMS, CrossDomainTrainer, KnowledgeDistiller, coral_loss, mcc_loss
from lepton_fast.trainers import _common
from lepton_fast.trainers.cross_domain import as_view

pytest.importorskip("torchmetrics")
pytest.importorskip("tqdm")

C, SIDE = 4, 8


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
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def make(terms, seed=0, teacher=None, student=None, **kw):
    torch.manual_seed(seed)
    student = Tiny() if student is None else student
    if teacher is None and "kd" in terms:
        teacher = Tiny()
    if terms:
        kw.setdefault("weak_augment", _noise)
        kw.setdefault("strong_augment", _noise)
    if "adversarial" in terms and kw.get("attack") != "vat":
        kw.setdefault("clamp", (0.0, 1.0))
    kw.setdefault("progress", False)
    return CrossDomainTrainer(student, terms=terms, teacher=teacher, seed=seed, device="cpu", **kw)


SOURCE, TARGET = blobs(64, 0), blobs(48, 1, shift=0.3)
FLEX = dict(num_unlabeled=len(TARGET[1]), threshold=0.3)


def test_distiller_round_trip_and_metrics_match_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    teacher = Tiny()
    KnowledgeDistiller(Tiny(), teacher, alpha=1.0, progress=False).fit(SOURCE, epochs=8, batch_size=16)
    student = Tiny()
    distiller = KnowledgeDistiller(teacher, student, temperature=2.0, alpha=0.5, lr=1e-2, progress=False)
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
            "dataloader": DataLoader(TensorDataset(*SOURCE), batch_size=32)}[form]
    torch.manual_seed(0)
    d = KnowledgeDistiller(Tiny(), Tiny(), progress=False)
    history = d.fit(data, batch_size=32)  # one epoch by default
    assert history["step"][-1] == 2  # 64 samples in batches of 32 (the DataLoader's own size)
    assert set(d.evaluate(data)) == {"accuracy", "macro_recall", "macro_f1"}


TERM_CASES = [("kd", {}), ("pseudo", {}), ("domain", {}), ("adversarial", {"attack": "fgsm"}),
              ("adversarial", {"attack": "pgd"}), ("adversarial", {"attack": "vat"}), ("coral", {}), ("mcc", {})]


@pytest.mark.parametrize("term,kw", TERM_CASES, ids=[f"{t}-{k.get('attack', '')}" for t, k in TERM_CASES])
def test_each_term_alone_trains_and_logs(term, kw):
    # a threshold of 0 keeps every pseudo-label, so the masked terms are never zero
    if term in ("pseudo", "adversarial"):
        kw = {**kw, "threshold": thresholds.FixedThreshold(0.0)}
    trainer = make((term,), **kw)
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


def test_flexmatch_gets_each_sample_position_without_an_index_in_the_data():
    # The target is a bare tensor: the trainer indexes samples by position, so after one
    # epoch at tau = 1/C every sample of the target has a remembered prediction.
    policy = thresholds.FlexMatchThreshold(C, num_unlabeled=48, threshold=1 / C)
    trainer = make(("pseudo",), threshold=policy)
    trainer.fit(SOURCE, TARGET[0], steps=3, batch_size=16)  # 3 batches of 16 = the 48 targets
    assert (policy.selected_label >= 0).all()


def test_bf16_autocast_runs():
    trainer = make(("kd", "pseudo"), amp="bf16")
    history = trainer.fit(SOURCE, TARGET, steps=2, batch_size=16)
    assert torch.isfinite(torch.tensor(history["train"][-1]["loss"]))


# -- generic data: no digit assumptions ------------------------------------------------------
def test_identity_views_and_plain_student_on_feature_vectors():
    # [N, F] standardised features (values far outside [0, 1]) and an nn.Sequential without
    # .features: every term that needs no feature split runs with the default views.
    g = torch.Generator().manual_seed(0)
    xs, ys = 3 * torch.randn(64, 5, generator=g), torch.arange(64) % 3
    xt = 3 * torch.randn(48, 5, generator=g) + 1
    torch.manual_seed(0)
    mlp = lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
    source_only = CrossDomainTrainer(mlp(), progress=False)
    source_only.fit((xs, ys), steps=2, batch_size=16)
    trainer = CrossDomainTrainer(mlp(), terms=("kd", "pseudo", "adversarial"), teacher=mlp(),
                                 threshold=thresholds.FixedThreshold(0.0), progress=False)
    history = trainer.fit((xs, ys), xt, steps=3, batch_size=16)
    assert {"kd", "pseudo", "adversarial"} <= set(history["train"][-1])


def test_views_take_x_alone_or_x_and_the_generator():
    x, g = torch.ones(2, 3), torch.Generator().manual_seed(0)
    calls = []

    def positional(x, generator):
        calls.append(generator)
        return x

    def keyword(x, *, generator=None):
        calls.append(generator)
        return x

    def scale(x, factor=2.0):  # a second parameter with a default is not the generator
        return x * factor

    for fn in (positional, keyword):
        assert torch.equal(as_view(fn, "weak_augment")(x, g), x)
    assert calls == [g, g]
    assert torch.equal(as_view(scale, "weak_augment")(x, g), 2 * x)
    assert torch.equal(as_view(torch.neg, "weak_augment")(x, g), -x)  # a builtin: f(x)
    assert torch.equal(as_view(None, "weak_augment")(x, g), x)
    assert torch.equal(as_view(nn.Dropout(0.0), "weak_augment")(x, g), x)  # a module: forward(x)
    with pytest.raises(TypeError, match="strong_augment"):
        as_view("flip", "strong_augment")
    with pytest.raises(TypeError, match="weak_augment.*requires"):
        as_view(lambda x, g, h: x, "weak_augment")


class TextClassifier(nn.Module):
    """fastText-style: mean of token embeddings (id 0 = padding), then a linear layer."""

    def __init__(self, vocab=50, dim=8, classes=2):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def token_ids(n, length, seed):
    """int64 [n, length] ids in [1, 50) with a random amount of trailing padding (0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, length), generator=g)
    keep = torch.randint(2, length + 1, (n, 1), generator=g)
    return ids.masked_fill(torch.arange(length) >= keep, 0), (ids[:, 0] % 2)


def _drop_tokens(tokens, generator):
    """A text view: each token dropped to padding with probability 0.2."""
    return tokens.masked_fill(torch.rand(tokens.shape, generator=generator) < 0.2, 0)


def _pad_batch(items):
    """A DataLoader collate_fn padding each batch to its own longest sequence."""
    length = max(int((t != 0).sum()) for t, _ in items)
    return torch.stack([t[:length] for t, _ in items]), torch.stack([y for _, y in items])


@pytest.mark.parametrize("padding", ["fixed", "per batch"])
def test_text_model_on_token_ids_through_every_term(padding):
    xs, ys = token_ids(64, 12, 0)
    xt, _ = token_ids(48, 12, 1)
    torch.manual_seed(0)
    student, teacher = TextClassifier(), TextClassifier()
    source = (xs, ys) if padding == "fixed" else DataLoader(TensorDataset(xs, ys), batch_size=16,
                                                            collate_fn=_pad_batch)
    trainer = CrossDomainTrainer(student, terms=TERMS, teacher=teacher, features="embed", classifier="head",
                                 perturb="features", eps=0.5, weak_augment=_drop_tokens, strong_augment=_drop_tokens,
                                 threshold=thresholds.FlexMatchThreshold(2, num_unlabeled=48, threshold=0.0),
                                 progress=False)
    before = student.embed.weight.detach().clone()
    history = trainer.fit(source, xt, steps=3, batch_size=16, validation_data=(xs, ys), eval_every=3)
    assert set(TERMS) <= set(history["train"][-1]) and history["validation"][-1]["step"] == 3
    assert not torch.equal(before, student.embed.weight)


def test_adversarial_on_token_ids_needs_perturb_features():
    xs, ys = token_ids(32, 6, 0)
    trainer = CrossDomainTrainer(TextClassifier(), terms=("adversarial",), progress=False)
    with pytest.raises(ValueError, match="perturb='features'"):
        trainer.fit((xs, ys), xs, steps=1, batch_size=16)


def test_feature_split_by_module_name_or_callable():
    student = Tiny()
    by_name = make(("domain",), student=student, features="features", classifier="classifier")
    assert by_name.features is student.features
    plain = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.ReLU(), nn.Linear(16, C))
    with_callables = make(("domain",), student=plain, features=lambda x: plain[:3](x), classifier=lambda f: plain[3](f))
    history = with_callables.fit(SOURCE, TARGET, steps=2, batch_size=16)
    assert "domain" in history["train"][-1]


@pytest.mark.parametrize("kw,match", [
    ({}, "features= and classifier="),
    ({"features": "body"}, "give both"),
    ({"features": "body", "classifier": "head"}, "not a submodule"),
    ({"features": nn.Linear(64, 16), "classifier": "1"}, "not the student's"),
])
def test_feature_split_errors_name_the_argument(kw, match):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
    with pytest.raises(ValueError, match=match):
        make(("domain",), student=plain, **kw)


def test_feature_split_must_reproduce_the_student():
    wrong = make(("domain",), features="features", classifier=lambda f: torch.zeros(f.shape[0], C))
    with pytest.raises(ValueError, match="classifier\\(features\\(x\\)\\) differs"):
        wrong.fit(SOURCE, TARGET, steps=1, batch_size=16)
    assert wrong.step == 0


# -- unlabeled data --------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["tensor", "tuple", "TensorDataset", "labeled"])
def test_target_may_be_unlabeled_in_any_form(form):
    x = TARGET[0]
    target = {"tensor": x, "tuple": (x,), "TensorDataset": TensorDataset(x), "labeled": TARGET}[form]
    history = make(("pseudo", "kd")).fit(SOURCE, target, steps=2, batch_size=16)
    assert "pseudo" in history["train"][-1]


def test_distiller_without_labels_at_alpha_0():
    torch.manual_seed(0)
    student = Tiny()
    before = [p.detach().clone() for p in student.parameters()]
    distiller = KnowledgeDistiller(Tiny(), student, alpha=0.0, progress=False)
    history = distiller.fit(SOURCE[0], batch_size=16)
    assert history["train"][-1]["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="alpha=0"):
        KnowledgeDistiller(Tiny(), Tiny(), progress=False).fit((SOURCE[0],))


def test_distiller_warns_when_every_label_is_ignored():
    ignored = (SOURCE[0], torch.full_like(SOURCE[1], -100))
    distiller = KnowledgeDistiller(Tiny(), Tiny(), progress=False)
    with pytest.warns(RuntimeWarning, match="exactly 0.*alpha=0"):
        history = distiller.fit(ignored, batch_size=16)
    assert history["train"][-1]["loss"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KnowledgeDistiller(Tiny(), Tiny(), progress=False).fit(SOURCE, batch_size=16)


def test_source_must_be_labeled():
    with pytest.raises(ValueError, match="source must be labeled"):
        make(()).fit(SOURCE[0], steps=1, batch_size=16)


def test_data_smaller_than_a_batch_names_the_argument_to_change():
    with pytest.raises(ValueError, match=r"source has 64 samples, fewer than one batch of 100: .*fit\(\.\.\., batch_size=\)"):
        make(()).fit(SOURCE, steps=1, batch_size=100)
    with pytest.raises(ValueError, match=r"target has 48 .* of 50: .*fit\(\.\.\., target_batch_size=\)"):
        make(("pseudo",)).fit(SOURCE, TARGET, steps=1, batch_size=16, target_batch_size=50)
    with pytest.raises(ValueError, match=r"source has 64 .* of 100: .*source's DataLoader"):
        make(()).fit(DataLoader(TensorDataset(*SOURCE), batch_size=100), steps=1)


def test_int32_labels_are_accepted():
    labels32 = SOURCE[1].to(torch.int32)
    make(("pseudo",)).fit((SOURCE[0], labels32), TARGET, steps=1, batch_size=16)
    KnowledgeDistiller(Tiny(), Tiny(), progress=False).fit((SOURCE[0], labels32), steps=1, batch_size=16)


# -- checks at the start of fit --------------------------------------------------------------
def _fit_on(trainer: str, data):
    """The trainer (KnowledgeDistiller or CrossDomainTrainer) and its fit(data, steps=2)."""
    t = KnowledgeDistiller(Tiny(), Tiny(), device="cpu", progress=False) if trainer == "distiller" else make(())
    return t, lambda: t.fit(data, steps=2, batch_size=16)


FIRST_SAMPLE_LABELS = [
    ("out of range", lambda y: torch.cat([torch.tensor([C]), y[1:]]), ValueError,
     r"^{data} labels must be classes in \[0, 4\).*got \[4\]"),
    ("negative", lambda y: torch.cat([torch.tensor([-1]), y[1:]]), ValueError, r"^{data} labels must be classes"),
    ("floating", lambda y: y.float(), TypeError, r"^{data} labels must be integer class indices"),
    ("one-hot", lambda y: nn.functional.one_hot(y, C), ValueError,
     r"^{data}: each sample's label must be one class index, but the first sample's label has shape \(4,\)"),
]


@pytest.mark.parametrize("trainer,data", [("distiller", "train_data"), ("cross_domain", "source")])
@pytest.mark.parametrize("what,change,error,match", FIRST_SAMPLE_LABELS, ids=[c[0] for c in FIRST_SAMPLE_LABELS])
def test_first_samples_labels_are_checked_before_the_first_step(what, change, error, match, trainer, data):
    """The README's promise: the first samples are checked before the first step, so the
    error names the data, not a training step, and no weight has moved."""
    t, fit = _fit_on(trainer, (SOURCE[0], change(SOURCE[1])))
    before = [p.detach().clone() for p in t.student.parameters()]
    with pytest.raises(error, match=match.format(data=data)):
        fit()
    assert t.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, t.student.parameters()))


@pytest.mark.parametrize("trainer,data", [("distiller", "train_data"), ("cross_domain", "source")])
def test_labels_after_the_first_sample_are_checked_by_their_step(trainer, data):
    y = SOURCE[1].clone()
    y[1:] = C  # the first sample passes; every batch holds another one
    _, fit = _fit_on(trainer, (SOURCE[0], y))
    with pytest.raises(ValueError, match=rf"^training step 1: {data} labels must be classes in \[0, 4\)"):
        fit()


@pytest.mark.parametrize("trainer,data", [("distiller", "train_data"), ("cross_domain", "source")])
def test_inputs_the_model_cannot_take_name_the_data(trainer, data):
    """A width the model does not take is the model's own error (its shapes are not guessed),
    with a note naming the data and the first sample's shape."""
    _, fit = _fit_on(trainer, (SOURCE[0][:, :, :, :6], SOURCE[1]))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as info:
        fit()
    assert any(f"first sample of {data}, of shape (1, 8, 6)" in note for note in info.value.__notes__)


def test_num_unlabeled_must_match_the_target_before_the_first_step():
    trainer = make(("pseudo",), threshold=thresholds.FlexMatchThreshold(C, num_unlabeled=40))
    with pytest.raises(ValueError, match="num_unlabeled=40 but the target has 48"):
        trainer.fit(SOURCE, TARGET, steps=2, batch_size=16)
    assert trainer.step == 0


def test_optimizer_over_other_parameters_is_refused():
    stranger = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="does not update any parameter of the student"):
        make((), optimizer=torch.optim.SGD(stranger.parameters(), lr=0.1)).fit(SOURCE, steps=1, batch_size=16)
    student = Tiny()
    both = list(student.parameters()) + list(stranger.parameters())
    with pytest.raises(ValueError, match="not the student's"):
        make((), student=student, optimizer=torch.optim.SGD(both, lr=0.1)).fit(SOURCE, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="discriminator would never train"):
        student = Tiny()
        make(("domain",), student=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.1)).fit(
            SOURCE, TARGET, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="student would never train"):
        KnowledgeDistiller(Tiny(), Tiny(), optimizer=torch.optim.SGD(stranger.parameters(), lr=0.1))
    # a part of the student (fine-tuning the head alone) is fine
    student = Tiny()
    make((), student=student, optimizer=torch.optim.SGD(student.classifier.parameters(), lr=0.1)).fit(
        SOURCE, steps=1, batch_size=16)


def test_a_scheduler_over_another_optimizer_is_refused():
    """Stepping it would change no learning rate of the trainer's ('break10': accepted, the
    student trained at the initial rate throughout)."""
    foreign = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1), step_size=1)
    with pytest.raises(ValueError, match="^scheduler was built over another optimizer than the trainer's"):
        KnowledgeDistiller(Tiny(), Tiny(), scheduler=foreign)
    with pytest.raises(ValueError, match="^scheduler was built over another optimizer"):
        make((), scheduler=foreign).fit(SOURCE, steps=1, batch_size=16)
    student = Tiny()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    own = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    make((), student=student, optimizer=optimizer, scheduler=own).fit(SOURCE, steps=2, batch_size=16)
    assert optimizer.param_groups[0]["lr"] == 0.025


def test_a_second_fit_to_the_same_steps_warns_that_nothing_trains():
    trainer = make(())
    trainer.fit(SOURCE, steps=2, batch_size=16)
    with pytest.warns(RuntimeWarning, match=r"^fit: this trainer has taken 2 optimiser steps, and steps \(or epochs\) "
                                            r"count from its first, 2 in all, so there is nothing to train"):
        trainer.fit(SOURCE, steps=2, batch_size=16)
    assert trainer.step == 2
    trainer.fit(SOURCE, steps=3, batch_size=16)
    assert trainer.step == 3


def test_lr_sets_the_default_optimizer_only():
    trainer = make((), lr=0.05)
    trainer.fit(SOURCE, steps=1, batch_size=16)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.05
    assert KnowledgeDistiller(Tiny(), Tiny(), lr=0.02).optimizer.param_groups[0]["lr"] == 0.02
    with pytest.raises(ValueError, match="lr"):
        make((), lr=0.05, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="lr"):
        KnowledgeDistiller(Tiny(), Tiny(), lr=-1.0)


@pytest.mark.parametrize("kw,match", [
    ({"weights": {"domain": 0.5}}, "weights\\['domain'\\].*not on"),
    ({"teacher": Tiny()}, "teacher is used by the 'kd' term"),
    ({"threshold": thresholds.FixedThreshold(0.5)}, "threshold is used by"),
    ({"discriminator": nn.Linear(16, 1)}, "discriminator is used by the 'domain' term"),
    ({"clamp": (0.0, 1.0)}, "clamp is used by the 'adversarial' term"),
    ({"features": "features", "classifier": "classifier"}, "features/classifier is used by"),
    ({"mcc_temperature": 2.0}, "mcc_temperature is used by the 'mcc' term"),
])
def test_arguments_for_a_term_that_is_off_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        make(("pseudo",) if "threshold" not in kw else ("kd",), **kw)


# -- the alignment terms ---------------------------------------------------------------------
def _coral_direct(s, t):
    """Sun & Saenko 2016, eq. 1-3, written out in float64."""
    def cov(x):
        n = x.shape[0]
        ones = torch.ones(n, 1, dtype=x.dtype)
        return (x.T @ x - (ones.T @ x).T @ (ones.T @ x) / n) / (n - 1)
    d = s.shape[1]
    return ((cov(s) - cov(t)) ** 2).sum() / (4 * d * d)


def _mcc_direct(z, temperature):
    """Jin et al. 2020, eq. 1-6, loop by loop in float64."""
    b, c = z.shape
    p = torch.softmax(z / temperature, 1)
    q = p.detach()  # the entropy weights are constants (as in the authors' code)
    h = [-sum(q[i, j] * torch.log(q[i, j]) for j in range(c)) for i in range(b)]
    w = torch.stack([b * (1 + torch.exp(-h[i])) / sum(1 + torch.exp(-hh) for hh in h) for i in range(b)])
    m = torch.zeros(c, c, dtype=z.dtype)
    for j in range(c):
        for k in range(c):
            m[j, k] = sum(p[i, j] * w[i] * p[i, k] for i in range(b))
    m = m / m.sum(1, keepdim=True)
    return sum(m[j, k] for j in range(c) for k in range(c) if j != k) / c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coral_loss_matches_the_paper_in_float64(dtype):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(24, 6, generator=g) * 2 + 1, torch.randn(17, 6, generator=g) * 0.5 - 3
    s, t = s.to(dtype), t.to(dtype)
    want = _coral_direct(s.double(), t.double())
    got = coral_loss(s, t)
    assert got.dtype == torch.float32 and want > 0.01
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mcc_loss_matches_the_paper_in_float64(temperature):
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 3
    want = _mcc_direct(z, temperature)
    got = mcc_loss(z.float(), temperature)
    assert got.dtype == torch.float32 and 0.05 < want < 1
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_alignment_gradients_reach_their_inputs():
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(8, 4, generator=g, requires_grad=True), torch.randn(8, 4, generator=g, requires_grad=True)
    coral_loss(s, t).backward()
    assert all(bool(x.grad.abs().sum() > 0) and bool(torch.isfinite(x.grad).all()) for x in (s, t))
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    _coral_direct(s64, t64).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z32 = z.detach().float().requires_grad_()
    mcc_loss(z32).backward()
    _mcc_direct(z, 2.5).backward()
    assert bool(z32.grad.abs().sum() > 0)
    torch.testing.assert_close(z32.grad.double(), z.grad, rtol=1e-4, atol=1e-7)


def test_mcc_is_zero_for_confident_disjoint_predictions_and_coral_for_equal_batches():
    z = torch.eye(4) * 200  # each row certain of another class
    assert float(mcc_loss(z, 1.0)) == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(14))
    assert float(coral_loss(x, x + 5)) == pytest.approx(0.0, abs=1e-7)  # a shift leaves the covariance


@pytest.mark.parametrize("call,match", [
    (lambda: coral_loss(torch.randn(1, 3), torch.randn(4, 3)), r"source must be \[N, D\] with N >= 2"),
    (lambda: coral_loss(torch.randn(4, 3), torch.randn(4, 2)), "same width"),
    (lambda: mcc_loss(torch.randn(4, 3, 2)), r"logits must be \[N, D\]"),
    (lambda: mcc_loss(torch.randn(4, 3), 0.0), "temperature"),
    (lambda: mcc_loss(torch.randn(4, 3), float("nan")), "temperature"),
])
def test_alignment_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_coral_needs_the_feature_split_and_a_batch_of_two():
    with pytest.raises(ValueError, match="the 'coral' term needs the student split"):
        CrossDomainTrainer(nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, C)), terms=("coral",), progress=False)
    with pytest.raises(ValueError, match=r"training step 1: source must be \[N, D\] with N >= 2"):
        make(("coral",)).fit(SOURCE, TARGET, steps=1, batch_size=1)


# -- the write-up's entry points ------------------------------------------------------------
@pytest.mark.parametrize("threshold", [None, 0.8, "flexmatch"])
def test_generate_pseudo_labels_is_the_teachers_thresholded_selection(threshold):
    torch.manual_seed(5)
    teacher = Tiny()
    with torch.no_grad():
        teacher.classifier.weight.mul_(80)  # confidences spread over (0.25, 1): a cut at 0.8 or 0.95 matters
    distiller = KnowledgeDistiller(teacher, Tiny(), progress=False, device="cpu")
    x = TARGET[0]
    if threshold == "flexmatch":  # class thresholds after an update: another cut per class
        threshold = thresholds.FlexMatchThreshold(C, **FLEX)
        logits = teacher.eval()(x)
        threshold.update(lepton_fast.select_pseudo_labels(logits, threshold=0.0), indices=torch.arange(len(x)))
    out = distiller.generate_pseudo_labels(x, threshold, batch_size=7)  # batches of 7: the same rows
    with torch.no_grad():
        p = torch.softmax(teacher.eval()(x).double(), 1)
    confidence, labels = p.max(1)
    cut = {None: 0.95, 0.8: 0.8}.get(threshold) if not isinstance(threshold, nn.Module) else \
        threshold.class_thresholds().double()[labels]
    assert torch.equal(out.labels, labels)
    torch.testing.assert_close(out.confidence.double(), confidence, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.mask, confidence >= cut)
    if not isinstance(threshold, nn.Module):
        assert 0 < int(out.mask.sum()) < len(x)  # the cut matters on this data


def test_generate_pseudo_labels_bad_input():
    distiller = KnowledgeDistiller(Tiny(), Tiny(), progress=False, device="cpu")
    with pytest.raises(TypeError, match="x_unlabeled must be a tensor"):
        distiller.generate_pseudo_labels([1, 2])
    with pytest.raises(TypeError, match="threshold must be"):
        distiller.generate_pseudo_labels(TARGET[0], "0.9")
    with pytest.raises(ValueError, match="threshold"):
        distiller.generate_pseudo_labels(TARGET[0], 1.5)
    with pytest.raises(ValueError, match="x_unlabeled"):
        distiller.generate_pseudo_labels(torch.full((2, 1, SIDE, SIDE), float("nan")))


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_generate_adversarial_samples_is_the_terms_attack(attack):
    trainer = make(("adversarial",), attack=attack, eps=0.05)
    x = TARGET[0][:16]
    labels = torch.arange(16) % C
    trainer.generator.manual_seed(7)  # pgd's random start draws from the trainer's generator
    got = trainer.generate_adversarial_samples(x, labels)
    if attack == "fgsm":
        want = lepton_fast.fgsm(trainer.student, x, labels, 0.05, clamp=(0.0, 1.0))
    else:
        want = lepton_fast.pgd(trainer.student, x, labels, 0.05, 2.5 * 0.05 / 3, 3, clamp=(0.0, 1.0),
                               generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want) and not torch.equal(got, x)
    assert float((got - x).abs().max()) <= 0.05 + 1e-6 and float(got.min()) >= 0 and float(got.max()) <= 1
    default = trainer.generate_adversarial_samples(x)  # the student's own predictions
    predicted = trainer.student.eval()(x).argmax(-1)
    trainer.student.train()
    if attack == "fgsm":
        assert torch.equal(default, lepton_fast.fgsm(trainer.student, x, predicted, 0.05, clamp=(0.0, 1.0)))


def test_generate_adversarial_samples_refuses_vat_and_out_of_bounds_inputs():
    with pytest.raises(ValueError, match="attack='vat' has no samples"):
        make(("adversarial",), attack="vat").generate_adversarial_samples(TARGET[0])
    with pytest.raises(ValueError, match="outside the bounds"):
        make(("adversarial",)).generate_adversarial_samples(TARGET[0] + 2)


# -- attack bounds ---------------------------------------------------------------------------
def _capture_attack(monkeypatch):
    seen = []
    real = lepton_fast.fgsm

    def fgsm(model, x, y, eps, *args, clamp=(0.0, 1.0), **kw):
        seen.append(clamp)
        return real(model, x, y, eps, *args, clamp=None, **kw)

    monkeypatch.setattr(lepton_fast, "fgsm", fgsm)
    return seen


def test_default_clamp_is_none_for_any_data(monkeypatch):
    seen = _capture_attack(monkeypatch)
    xs = 7 * (SOURCE[0] - 0.5)  # standardised-like values in [-3.5, 3.5]
    trainer = CrossDomainTrainer(Tiny(), terms=("adversarial",), threshold=thresholds.FixedThreshold(0.0),
                                 progress=False)
    trainer.fit((xs, SOURCE[1]), 7 * (TARGET[0] - 0.5), steps=2, batch_size=16)
    assert seen == [None, None]


def test_per_channel_bounds_pass_through_unchanged(monkeypatch):
    seen = _capture_attack(monkeypatch)
    lo, hi = torch.full((1, 1, 1), -0.1), torch.full((1, 1, 1), 1.1)
    make(("adversarial",), clamp=(lo, hi), threshold=thresholds.FixedThreshold(0.0)).fit(
        SOURCE, TARGET, steps=1, batch_size=16)
    assert seen[0][0] is lo and seen[0][1] is hi


def test_inputs_outside_the_bounds_are_refused():
    with pytest.raises(ValueError, match="outside the bounds"):
        make(("adversarial",), clamp=(0.0, 0.5)).fit(SOURCE, TARGET, steps=1, batch_size=16)
    # a view that leaves the bounds by more than eps: the attack kernel refuses it in the first
    # step (one slightly outside is caught at the end of the first logging window)
    trainer = make(("adversarial",), weak_augment=lambda x: x + 2.0, threshold=thresholds.FixedThreshold(0.0))
    with pytest.raises(ValueError, match="outside the clamp box"):
        trainer.fit(SOURCE, TARGET, steps=3, batch_size=16)
    with pytest.raises(ValueError, match="vat"):
        make(("adversarial",), attack="vat", clamp=(0.0, 1.0))
    with pytest.raises(TypeError, match="clamp"):
        make(("adversarial",), clamp=1.0)


# -- collapse --------------------------------------------------------------------------------
class _Bar:
    def __init__(self, *args, **kwargs):
        self.postfix = []

    def set_postfix(self, values, refresh=True):
        self.postfix.append(values)

    def update(self, n):
        pass

    def close(self):
        pass


def test_collapse_is_warned_shown_and_reported_with_threshold_state(monkeypatch):
    bars = []
    monkeypatch.setattr(_common, "progress", lambda *a, **k: bars.append(_Bar()) or bars[-1])
    trainer = make(("pseudo",), threshold=thresholds.FixedThreshold(0.5), distribution_alignment=False,
                   optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    with torch.no_grad():
        trainer.student.classifier.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    with pytest.warns(RuntimeWarning, match="collapse.*class 0"):
        trainer.fit(SOURCE, TARGET, steps=3, batch_size=16)
    assert trainer.collapse and "class 0" in trainer.collapse and "FixedThreshold" in trainer.collapse
    assert bars[0].postfix[-1]["collapse"] == "class 0"


# -- evaluation and consistency --------------------------------------------------------------
def test_evaluate_before_fit():
    torch.manual_seed(0)
    model = Tiny()
    accuracy = (model.eval()(SOURCE[0]).argmax(-1) == SOURCE[1]).float().mean().item()
    scores = CrossDomainTrainer(model, progress=False).evaluate(SOURCE)
    assert set(scores) == {"accuracy", "macro_recall", "macro_f1"}
    assert scores["accuracy"] == pytest.approx(accuracy)
    assert KnowledgeDistiller(Tiny(), model, progress=False).evaluate(SOURCE) == scores
    with pytest.raises(ValueError, match="labeled"):
        CrossDomainTrainer(Tiny(), progress=False).evaluate(SOURCE[0])


def test_one_default_temperature_everywhere():
    defaults = {f.__name__: inspect.signature(f).parameters["temperature"].default
                for f in (lepton_fast.fused_kd_loss, lepton_fast.KDLoss, CrossDomainTrainer, KnowledgeDistiller)}
    assert set(defaults.values()) == {1.0}, defaults


def test_steps_or_epochs_in_both_trainers():
    cross = make(())
    assert cross.fit(SOURCE, epochs=2, batch_size=16)["step"][-1] == 8  # 64 / 16 = 4 steps per epoch
    assert make(()).fit(SOURCE, batch_size=16)["step"][-1] == 4  # one epoch by default
    distil = KnowledgeDistiller(Tiny(), Tiny(), progress=False)
    assert distil.fit(SOURCE, steps=3, batch_size=16)["step"][-1] == 3
    for trainer in (make(()), KnowledgeDistiller(Tiny(), Tiny(), progress=False)):
        with pytest.raises(ValueError, match="steps or epochs"):
            trainer.fit(SOURCE, steps=2, epochs=1)
        with pytest.raises(ValueError, match="epochs"):
            trainer.fit(SOURCE, epochs=0)


# -- reproducibility -------------------------------------------------------------------------
def _seeded_run(seed):
    trainer = make(TERMS, seed=seed, attack="pgd",
                   threshold=thresholds.FlexMatchThreshold(C, **FLEX), weights={"domain": 0.5})
    history = trainer.fit(SOURCE, TARGET, steps=4, batch_size=16, validation_data=TARGET, eval_every=2)
    return history, torch.cat([p.detach().flatten() for p in trainer.student.parameters()])


def test_same_seed_gives_bit_identical_histories():
    (h1, p1), (h2, p2), (h3, _) = _seeded_run(3), _seeded_run(3), _seeded_run(4)
    assert h1 == h2 and torch.equal(p1, p2)
    assert h1["train"] != h3["train"]


# -- checkpoints -----------------------------------------------------------------------------
def _state(trainer):
    state = trainer.state_dict()
    return state["modules"], state["optimizer"]["state"], state["scheduler"], state["rng"]


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
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


def _interrupt_at(trainer, step):
    real, calls = trainer._train_step, []

    def interrupted():
        calls.append(1)
        if len(calls) == step:  # Ctrl-C during this step
            raise KeyboardInterrupt
        return real()

    trainer._train_step = interrupted


@pytest.mark.filterwarnings("ignore:pseudo-label collapse")
def test_resume_gives_the_same_next_step(tmp_path):
    def kw():
        return dict(threshold=thresholds.FlexMatchThreshold(C, **FLEX), attack="pgd", weights={"domain": 0.5},
                    scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))

    straight = make(TERMS, **kw())
    straight.fit(SOURCE, TARGET, steps=5, batch_size=16)

    path = str(tmp_path / "run.pt")
    first = make(TERMS, checkpoint=path, checkpoint_every=2, **kw())
    _interrupt_at(first, 5)  # the last checkpoint is step 4's
    with pytest.raises(KeyboardInterrupt):
        first.fit(SOURCE, TARGET, steps=5, batch_size=16)
    assert os.path.exists(path) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert _common.load_checkpoint(path)["step"] == 4

    resumed = make(TERMS, seed=0, checkpoint=path, **kw())
    resumed.fit(SOURCE, TARGET, steps=5, batch_size=16)
    assert resumed.step == 5 and int(resumed.grl.step_count) == 5
    _assert_same(_state(straight), _state(resumed))


def test_resume_says_so(tmp_path, capsys):
    # A second run of a finished script resumes at its last step and trains nothing: the
    # progress bar says where it resumed, so that this does not look like a silent no-op.
    path = str(tmp_path / "run.pt")
    make(("pseudo",), checkpoint=path).fit(SOURCE, TARGET, steps=2, batch_size=16)
    again = make(("pseudo",), checkpoint=path, progress=True)
    again.fit(SOURCE, TARGET, steps=2, batch_size=16)
    assert again.step == 2
    assert f"resumed from {path} at step 2" in capsys.readouterr().err


def test_resume_from_another_configuration_names_the_checkpoint(tmp_path):
    path = str(tmp_path / "run.pt")
    flex = thresholds.FlexMatchThreshold(C, **FLEX)
    make(("pseudo",), checkpoint=path, threshold=flex).fit(SOURCE, TARGET, steps=2, batch_size=16)
    with pytest.raises(RuntimeError, match="run.pt.*another configuration"):
        make(("pseudo",), checkpoint=path).fit(SOURCE, TARGET, steps=3, batch_size=16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="terms"):
        make(("kd", "mixup"))
    with pytest.raises(ValueError, match="temperature"):
        make(("kd",), temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        KnowledgeDistiller(Tiny(), Tiny(), temperature=-2.0)
    with pytest.raises(ValueError, match="divergence"):
        KnowledgeDistiller(Tiny(), Tiny(), divergence="kl")
    with pytest.raises(ValueError, match="teacher"):
        CrossDomainTrainer(Tiny(), terms=("kd",))
    with pytest.raises(ValueError, match="alpha"):
        KnowledgeDistiller(Tiny(), Tiny(), alpha=1.5)
    with pytest.raises(ValueError, match="attack"):
        make(("adversarial",), attack="cw")
    with pytest.raises(ValueError, match="perturb"):
        make(("adversarial",), perturb="logits")
    with pytest.raises(ValueError, match="teacher predicts 3 classes but student predicts 4"):
        KnowledgeDistiller(Tiny(classes=3), Tiny(), progress=False).fit(SOURCE)
    with pytest.raises(ValueError, match="teacher predicts 3 classes"):
        make(("kd",), teacher=Tiny(classes=3)).fit(SOURCE, TARGET, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="need target"):
        make(("pseudo",)).fit(SOURCE, steps=1)
    with pytest.raises(ValueError, match="no term uses it"):
        make(()).fit(SOURCE, TARGET, steps=1)
    with pytest.raises(TypeError, match="train_data"):
        KnowledgeDistiller(Tiny(), Tiny(), progress=False).fit([1, 2, 3])
    with pytest.raises(ValueError, match="first \\(sample\\) dimension"):
        make(()).fit((SOURCE[0], SOURCE[1][:10]), steps=1)
    with pytest.raises(TypeError, match="optimizer"):
        KnowledgeDistiller(Tiny(), Tiny(), optimizer="adam")
    with pytest.raises(ValueError, match="fp16"):
        make((), amp="fp16")  # fp16 autocast needs CUDA


# -- DistributedDataParallel (2 gloo processes on CPU) ----------------------------------------
def _ddp_trainer(**kw):
    return make(("kd", "pseudo", "domain", "adversarial"), threshold=thresholds.FlexMatchThreshold(C, **FLEX),
                **kw)


def _flat(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.student.parameters()])


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # 1. replicas and global state stay identical; record what the threshold was given
        trainer = _ddp_trainer()
        updates = []
        real_update = trainer._update_threshold

        def recording(out, all_targets, positions):
            updates.append({"local": (out.labels.clone(), out.confidence.clone(), out.mask.clone(),
                                      positions.clone(), trainer.alignment.p_model.clone())})
            real_update(out, all_targets, positions)
            updates[-1]["state"] = {k: v.clone() for k, v in trainer.threshold.state_dict().items()}

        trainer._update_threshold = recording
        history = trainer.fit(SOURCE, TARGET, steps=3, batch_size=8, validation_data=TARGET, eval_every=3)
        global_state = {k: {n: t.clone() for n, t in trainer._modules()[k].state_dict().items()}
                        for k in ("threshold", "alignment", "grl")}

        # 2. a resume restores every rank's own random state
        path = os.path.join(out_dir, "run.pt")
        straight = _ddp_trainer()
        straight.fit(SOURCE, TARGET, steps=4, batch_size=8)
        first = _ddp_trainer(checkpoint=path, checkpoint_every=2)
        _interrupt_at(first, 3)
        try:
            first.fit(SOURCE, TARGET, steps=4, batch_size=8)
        except KeyboardInterrupt:
            pass
        resumed = _ddp_trainer(checkpoint=path)
        resumed.fit(SOURCE, TARGET, steps=4, batch_size=8)
        torch.save({"params": _flat(trainer), "buffers": trainer.student.state_dict(),
                    "validation": history["validation"], "train": history["train"],
                    "updates": updates, "global": global_state,
                    "resume": {"straight": (_flat(straight), straight.generator.get_state(), torch.get_rng_state()),
                               "resumed": (_flat(resumed), resumed.generator.get_state(), torch.get_rng_state())},
                    "histories": (straight.history, resumed.history)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in (0, 1))
    # DDP keeps the replicas identical, BatchNorm's running statistics included (synchronised
    # after each step; the adversarial term's second forward comes before the backward);
    # metrics and logged losses are reduced across ranks
    assert torch.equal(r0["params"], r1["params"])
    _assert_same(r0["buffers"], r1["buffers"])
    assert int(r0["buffers"]["features.2.num_batches_tracked"]) > 0
    assert r0["validation"] == r1["validation"] and r0["train"] == r1["train"]
    # threshold, alignment and GRL state are global: the same on both ranks...
    _assert_same(r0["global"], r1["global"])
    # ... and what one process would hold after updating with the global batches (rank
    # 0's rows, then rank 1's), step by step
    replay = thresholds.FlexMatchThreshold(C, **FLEX)
    for u0, u1 in zip(r0["updates"], r1["updates"]):
        labels, confidence, mask, positions = (torch.cat([a, b]) for a, b in zip(u0["local"][:4], u1["local"][:4]))
        assert torch.equal(u0["local"][4], u1["local"][4])  # alignment: the same global p_model
        replay.update(lepton_fast.PseudoLabels(labels, confidence, mask), indices=positions)
        _assert_same(replay.state_dict(), u0["state"])
        _assert_same(replay.state_dict(), u1["state"])
    assert len(r0["updates"]) == 3 and (replay.selected_label >= 0).any()
    # each rank resumed its own random state: the resumed run equals the straight run on
    # every rank, and the ranks' generators differ from each other
    for r in (r0, r1):
        _assert_same(r["resume"]["straight"], r["resume"]["resumed"])
        assert r["histories"][0] == r["histories"][1]  # each rank's part of the window under way was saved
    assert not torch.equal(r0["resume"]["resumed"][1], r1["resume"]["resumed"][1])


def test_trainers_do_not_import_the_example_data_or_the_demo():
    imported = set()
    for path in Path(lepton_fast.trainers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    assert not {m for m in imported if m.startswith(("lepton_fast.tasks",))}, imported


# -- non-finite values stop training; bad data gets errors naming the data and the fix --------
def _with_nan(data, position):
    x = data[0].clone()
    x[position, 0, 3, 3] = float("nan")
    return x, data[1]


def _distiller(**kw):
    torch.manual_seed(0)
    return KnowledgeDistiller(Tiny(), Tiny(), device="cpu", progress=False, **kw)


def _fit_data(where, steps, poisoned):
    """A trainer reading ``where`` (source, target or the distiller's train_data), with one
    NaN in sample 5 of it when ``poisoned``; (trainer, the error fit raised or None)."""
    data = {"source": SOURCE, "target": TARGET, "train_data": SOURCE}
    if poisoned:
        data[where] = _with_nan(data[where], 5)
    if where == "train_data":
        trainer, args = _distiller(), (data["train_data"],)
    else:
        trainer, args = make(("pseudo",), threshold=thresholds.FreeMatchThreshold(C)), (data["source"], data["target"])
    try:
        trainer.fit(*args, steps=steps, batch_size=16)
    except ValueError as e:
        return trainer, e
    return trainer, None


@pytest.mark.parametrize("where", ["source", "target", "train_data"])
def test_a_nan_input_stops_at_its_step_with_the_state_of_the_step_before(where):
    # The case: one NaN in the source inputs trained to NaN weights with no error.
    stopped, error = _fit_data(where, 8, poisoned=True)
    assert error is not None and re.search(
        rf"^training step {stopped.step + 1}: {where} batch \d+ of epoch \d: x holds NaN or ±inf in the samples at "
        rf"these positions of the data; got \[5\]$", str(error)), error
    # nothing of the NaN got in: the state is the clean run's, stopped one step earlier
    assert stopped.step >= 1  # (sample 5 comes in a later batch than the first with this seed)
    clean, none = _fit_data(where, stopped.step, poisoned=False)
    assert none is None
    _assert_same(_state(clean)[:3], _state(stopped)[:3])


class Overflows(Tiny):
    """Finite weights whose logits overflow float32: the loss is not finite."""

    def forward(self, x):
        return super().forward(x) * 1e38 * 1e38  # ±inf


@pytest.mark.parametrize("kind", ["cross_domain", "distiller"])
def test_a_non_finite_loss_stops_before_the_weights_change_and_no_checkpoint_is_written(tmp_path, kind):
    path = str(tmp_path / "run.pt")
    torch.manual_seed(0)
    if kind == "cross_domain":
        trainer = make((), student=Overflows(), checkpoint=path)
    else:
        trainer = KnowledgeDistiller(Tiny(), Overflows(), alpha=1.0, device="cpu", progress=False, checkpoint=path)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    with pytest.raises((FloatingPointError, ValueError), match=r"^training step 1: .*(not finite|NaN|inf)"):
        trainer.fit(SOURCE, steps=3, batch_size=16)
    assert trainer.step == 0 and not trainer.optimizer.state  # no optimiser step was taken
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    assert not os.path.exists(path)


def test_the_loss_check_names_the_term():
    trainer = make(())
    trainer.fit(SOURCE, steps=1, batch_size=16)
    with pytest.raises(FloatingPointError, match=r"the loss is not finite \(kd=nan, loss=nan\)"):
        trainer._optimize(torch.tensor(float("nan"), requires_grad=True),
                          {"source": torch.tensor(0.5), "kd": torch.tensor(float("nan"))})


@pytest.mark.parametrize("kind", ["cross_domain", "distiller"])
def test_evaluate_refuses_non_finite_inputs_and_labels_out_of_range(kind):
    trainer = make(()) if kind == "cross_domain" else _distiller()
    x, y = _with_nan(TARGET, 3)
    at = "in the samples at these positions of the data; got"
    with pytest.raises(ValueError, match=rf"evaluate: data: x holds NaN or ±inf {at} \[3\]$"):
        trainer.evaluate((x, y))
    with pytest.raises(ValueError, match=r"data labels must be classes in \[0, 4\).*got \[4, "):
        trainer.evaluate((TARGET[0], torch.where(TARGET[1] == 1, 4, TARGET[1])))
    with torch.no_grad():
        trainer.student.classifier.bias[2] = float("inf")
        trainer.student.classifier.weight[2] = 0.0  # +inf logits in class 2 for every sample
    with pytest.raises(ValueError, match=rf"evaluate: the model's logits holds NaN or ±inf {at} \[0, 1, "):
        trainer.evaluate(TARGET)


def test_distribution_alignment_refuses_non_finite_logits_and_keeps_its_state():
    from lepton_fast.trainers import DistributionAlignment

    align = DistributionAlignment(C, momentum=0.9)
    align(torch.randn(8, C))
    before = align.p_model.clone()
    logits = torch.randn(8, C)
    logits[3, 1] = float("nan")
    with pytest.raises(ValueError, match="DistributionAlignment: a row of logits holds NaN"):
        align(logits)
    assert torch.equal(align.p_model, before)
    with pytest.raises(TypeError, match="momentum"):
        DistributionAlignment(C, momentum=True)


def test_labels_out_of_range_name_the_data():
    bad = torch.where(SOURCE[1] == 2, C, SOURCE[1])  # 4 with 4 classes
    with pytest.raises(ValueError, match=r"training step 1: source labels must be classes in \[0, 4\), as the model "
                                         r"predicts 4 classes; got \[4"):
        make(()).fit((SOURCE[0], bad), steps=2, batch_size=64)
    with pytest.raises(ValueError, match=r"train_data labels must be classes in \[0, 4\) or ignore_index=-100"):
        _distiller().fit((SOURCE[0], bad), steps=2, batch_size=64)
    ignored = torch.where(SOURCE[1] == 2, -100, SOURCE[1])
    _distiller().fit((SOURCE[0], ignored), steps=1, batch_size=64)  # ignore_index stays allowed


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
@pytest.mark.parametrize("where", ["source", "target", "train_data"])
def test_inputs_the_model_cannot_take_are_named_with_the_fix(dtype, where):
    data = {"source": SOURCE, "target": TARGET, "train_data": SOURCE}
    x = data[where][0]
    data[where] = ((x * 10).to(dtype), data[where][1])
    fix = r"x\.float\(\)" if dtype == torch.int64 else r"convert the data \(x\.to\(torch\.float32\)\)"
    with pytest.raises(TypeError, match=rf"{where} inputs are {dtype}.*{fix}"):
        if where == "train_data":
            _distiller().fit(data["train_data"], steps=1)
        else:
            make(("pseudo",)).fit(data["source"], data["target"], steps=1, batch_size=16)


def test_mixed_precision_takes_other_input_dtypes():
    trainer = make((), amp="bf16")
    trainer.fit((SOURCE[0].bfloat16(), SOURCE[1]), steps=1, batch_size=16)


@pytest.mark.parametrize("build, error, match", [
    (lambda: make(("pseudo",), weights={"pseudo": float("inf")}), ValueError, r"weights\['pseudo'\] must be a finite"),
    (lambda: make(("pseudo",), weights={"pseudo": float("nan")}), ValueError, r"weights\['pseudo'\]"),
    (lambda: make(("pseudo",), weights={"pseudo": True}), TypeError, r"weights\['pseudo'\]"),
    (lambda: make((), lr=True), TypeError, "lr must be a real number"),
    (lambda: make((), lr=float("inf")), ValueError, "lr must be a finite number"),
    (lambda: _distiller(alpha=True), TypeError, "alpha must be a real number"),
    (lambda: _distiller(temperature="2"), TypeError, "temperature must be a real number"),
    (lambda: make(("kd",), temperature=float("nan")), ValueError, "temperature"),
    (lambda: make((), checkpoint_every=2.0), TypeError, "checkpoint_every must be an int"),
    (lambda: make(("pseudo",), warmup_steps=True), TypeError, "warmup_steps must be an int"),
    (lambda: make(("adversarial",), eps=float("inf")), ValueError, "eps"),
    (lambda: make(("pseudo",), alignment_momentum=1.0), ValueError, "alignment_momentum"),
    (lambda: make((), seed=1.5), TypeError, "seed must be an int"),
])
def test_settings_are_checked_by_the_one_validator(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_steps_and_batch_size_must_be_ints():
    with pytest.raises(TypeError, match="steps must be an int"):
        make(()).fit(SOURCE, steps=2.0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        make(()).fit(SOURCE, steps=2, batch_size=True)
