"""The text model trains through the package's CrossDomainTrainer, every term on, with
nothing text-specific in the trainer: views, teacher and optimizer are arguments."""
import functools
import inspect
import warnings

import pytest
import torch

from lepton_fast.data import IndexedTensorDataset
from lepton_fast.tasks.sentiment.text import HashedNgramClassifier, LexiconTeacher, encode, strong_text_view, weak_text_view

pytest.importorskip("torchmetrics")


def _trainer():
    from lepton_fast.trainers import CrossDomainTrainer

    # Until the trainers branch (issue 14 item 7) is merged: unlabeled targets, perturb=.
    if "perturb" not in inspect.signature(CrossDomainTrainer).parameters:
        pytest.skip("needs the CrossDomainTrainer of the trainers branch (perturb='features', unlabeled targets)")
    return CrossDomainTrainer

POSITIVE = ["great", "good", "love", "excellent", "works"]
NEGATIVE = ["bad", "awful", "broke", "terrible", "returned"]
LEXICON = {"great": 3.1, "good": 1.9, "love": 3.2, "excellent": 2.7, "bad": -2.5, "awful": -2.0, "terrible": -2.1}


def _corpus(n, fillers, seed):
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        pick = lambda vocab: vocab[int(torch.randint(len(vocab), (1,), generator=g))]  # noqa: E731
        texts.append(" ".join([pick(fillers), pick(words), pick(fillers), pick(words)]))
        labels.append(label)
    return IndexedTensorDataset(encode(texts, 8), torch.tensor(labels))


@pytest.mark.parametrize("terms", [("kd",), ("pseudo",), ("domain",), ("adversarial",),
                                   ("kd", "pseudo", "domain", "adversarial")])
def test_text_model_trains_through_cross_domain_trainer(terms):
    from lepton_fast.thresholds import FlexMatchThreshold

    CrossDomainTrainer = _trainer()

    source = _corpus(128, ["the movie", "this film", "the plot"], 0)
    target = _corpus(96, ["this dvd player", "the remote", "my camera"], 1)
    torch.manual_seed(0)
    student = HashedNgramClassifier(num_classes=2, buckets=2**12, dim=16)
    kw = {"weak_augment": weak_text_view, "strong_augment": strong_text_view}
    if "kd" in terms:
        kw["teacher"] = LexiconTeacher(LEXICON)
    if {"pseudo", "adversarial"} & set(terms):
        kw.update(threshold=FlexMatchThreshold(2, num_unlabeled=len(target), threshold=0.8), warmup_steps=10)
    if "adversarial" in terms:
        kw.update(attack="vat", eps=0.05, perturb="features")
    trainer = CrossDomainTrainer(student, terms=terms, optimizer=functools.partial(torch.optim.Adagrad, lr=0.1),
                                 device="cpu", seed=0, progress=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny two-class run may trip the collapse warning
        history = trainer.fit(source, target.x, steps=30, batch_size=16, validation_data=target, eval_every=30)
    assert history["validation"][-1]["accuracy"] >= 0.9  # the sentiment words are shared by both domains
    logged = set().union(*history["train"])
    for term in terms:
        assert term in logged
