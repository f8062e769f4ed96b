"""Threshold state (lepton_fast.thresholds): hand-computed updates, state_dict round trips."""
import math
from types import SimpleNamespace

import pytest
import torch

from lepton_fast import fused_pseudo_label_loss, select_pseudo_labels
from lepton_fast.thresholds import FixedThreshold, FlexMatchThreshold, FreeMatchThreshold, SoftMatchWeight


def _result(labels, confidence):
    labels = torch.tensor(labels)
    confidence = torch.tensor(confidence)
    return SimpleNamespace(labels=labels, confidence=confidence, mask=confidence >= 0)


def test_fixed_threshold():
    policy = FixedThreshold(0.8)
    assert policy.loss_kwargs() == {"threshold": 0.8} == policy(torch.randn(2, 3))
    policy.update(_result([0], [0.5]))
    assert policy.state_dict() == {}
    with pytest.raises(ValueError, match="threshold"):
        FixedThreshold(1.2)


def test_flexmatch_hand_computed_with_warmup():
    policy = FlexMatchThreshold(num_classes=3, num_unlabeled=5, threshold=0.9)
    assert torch.equal(policy.class_thresholds(), torch.zeros(3))  # beta = 0: everything passes at first
    # Confidences >= 0.9 are remembered: samples 0 -> class 0, 2 -> class 2; 3 of 5 unused.
    policy.update(_result([0, 1, 2], [0.95, 0.5, 0.92]), indices=torch.tensor([0, 1, 2]))
    assert policy.selected_label.tolist() == [0, -1, 2, -1, -1]
    # warm-up: sigma = (1, 0, 1), max(max sigma, unused) = 3 -> beta = (1/3, 0, 1/3)
    torch.testing.assert_close(policy.classwise_acc, torch.tensor([1 / 3, 0.0, 1 / 3]))
    third = 0.9 * (1 / 3) / (2 - 1 / 3)  # convex mapping x / (2 - x)
    torch.testing.assert_close(policy.loss_kwargs()["class_thresholds"], torch.tensor([third, 0.0, third]))
    # Sample 1 reaches 0.95 as class 1; samples 3, 4 as class 0: sigma = (3, 1, 1), none unused.
    policy.update(_result([0, 0, 1], [0.99, 0.91, 0.95]), indices=torch.tensor([3, 4, 1]))
    assert policy.selected_label.tolist() == [0, 1, 2, 0, 0]
    torch.testing.assert_close(policy.classwise_acc, torch.tensor([1.0, 1 / 3, 1 / 3]))
    torch.testing.assert_close(policy.class_thresholds(), torch.tensor([0.9, third, third]))
    # Every sample class 0: one value holds them all, so (as USB) beta stays where it was.
    policy.update(_result([0, 0], [0.99, 0.99]), indices=torch.tensor([1, 2]))
    torch.testing.assert_close(policy.classwise_acc, torch.tensor([1.0, 1 / 3, 1 / 3]))


def test_flexmatch_without_warmup():
    policy = FlexMatchThreshold(num_classes=3, num_unlabeled=5, threshold=0.9, warmup=False)
    policy.update(_result([0, 1, 2], [0.95, 0.5, 0.92]), indices=torch.tensor([0, 1, 2]))
    # sigma = (1, 0, 1) normalised by max sigma = 1, the unused samples left out.
    torch.testing.assert_close(policy.classwise_acc, torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(policy.class_thresholds(), torch.tensor([0.9, 0.0, 0.9]))


def test_freematch_hand_computed():
    policy = FreeMatchThreshold(num_classes=2, momentum=0.5)
    torch.testing.assert_close(policy.class_thresholds(), torch.tensor([0.5, 0.5]))  # 1/C, uniform
    weak = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # probabilities (1/4, 3/4), (1/2, 1/2)
    policy.update(select_pseudo_labels(weak), weak_logits=weak)
    # tau = 0.5 * 1/2 + 0.5 * mean(3/4, 1/2) = 0.5625; p = 0.5 * (1/2, 1/2) + 0.5 * (3/8, 5/8)
    torch.testing.assert_close(policy.time_p, torch.tensor(0.5625))
    torch.testing.assert_close(policy.p_model, torch.tensor([0.4375, 0.5625]))
    torch.testing.assert_close(policy.loss_kwargs()["class_thresholds"], torch.tensor([0.4375, 0.5625]))
    policy.update(select_pseudo_labels(weak), weak_logits=weak)
    # tau = 0.5 * 0.5625 + 0.5 * 0.625; p = 0.5 * (0.4375, 0.5625) + 0.5 * (3/8, 5/8)
    torch.testing.assert_close(policy.time_p, torch.tensor(0.59375))
    torch.testing.assert_close(policy.p_model, torch.tensor([0.40625, 0.59375]))
    torch.testing.assert_close(policy.class_thresholds(), 0.59375 * torch.tensor([0.40625 / 0.59375, 1.0]))


def test_softmatch_hand_computed():
    policy = SoftMatchWeight(num_classes=4, n_sigma=2.0, momentum=0.5)
    policy.update(_result([0, 1], [0.5, 0.9]))
    # mean 0.7, unbiased var 0.08: mu = 0.5 * 0.25 + 0.5 * 0.7, var = 0.5 * 1 + 0.5 * 0.08
    torch.testing.assert_close(policy.mu, torch.tensor(0.475))
    torch.testing.assert_close(policy.var, torch.tensor(0.54))
    w = policy.weights(torch.tensor([0.2, 0.475, 0.9]))
    expected = math.exp(-((0.2 - 0.475) ** 2) / (2 * 0.54 / 2.0**2))
    torch.testing.assert_close(w, torch.tensor([expected, 1.0, 1.0]))
    policy.update(_result([3], [0.1]))  # one row: the mean moves, the variance cannot be estimated
    torch.testing.assert_close(policy.mu, torch.tensor(0.2875))
    torch.testing.assert_close(policy.var, torch.tensor(0.54))


def test_softmatch_weights_flow_into_the_loss():
    policy = SoftMatchWeight(num_classes=5)
    weak, strong = torch.randn(6, 5) * 2, torch.randn(6, 5)
    kw = policy.loss_kwargs(weak)
    conf = select_pseudo_labels(weak).confidence
    torch.testing.assert_close(kw["weights"], policy.weights(conf))
    out = fused_pseudo_label_loss(strong, weak, **kw)
    assert out.mask.all()  # threshold 0: every row kept, weighted
    with pytest.raises(ValueError, match="weak_logits"):
        policy.loss_kwargs()


def _drive(policy, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        weak = torch.randn(8, 4, generator=g) * 3
        strong = torch.randn(8, 4, generator=g)
        idx = torch.randperm(20, generator=g)[:8]
        out = fused_pseudo_label_loss(strong, weak, **policy.loss_kwargs(weak))
        policy.update(out, weak_logits=weak, indices=idx)
    return policy.loss_kwargs(torch.ones(8, 4))


FACTORIES = {
    "flexmatch": lambda: FlexMatchThreshold(4, 20, threshold=0.7),
    "freematch": lambda: FreeMatchThreshold(4, momentum=0.9),
    "softmatch": lambda: SoftMatchWeight(4, momentum=0.9),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip_resumes(name):
    make = FACTORIES[name]
    uninterrupted = make()
    _drive(uninterrupted, 3, seed=0)
    expected = _drive(uninterrupted, 2, seed=1)

    first = make()
    _drive(first, 3, seed=0)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = make()
    resumed.load_state_dict(state)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, state[key]), key
    got = _drive(resumed, 2, seed=1)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # The state moved: a fresh module would give other thresholds.
    fresh = make().loss_kwargs(torch.ones(8, 4))
    assert any(not torch.equal(torch.as_tensor(fresh[k]), torch.as_tensor(got[k])) for k in got)


def test_missing_or_bad_arguments_are_named():
    with pytest.raises(ValueError, match="needs indices: each row's position in the unlabeled set.*IndexedTensorDataset"):
        FlexMatchThreshold(3, 10).update(_result([0], [0.99]))
    with pytest.raises(ValueError, match="indices"):
        FlexMatchThreshold(3, 10).update(_result([0, 1], [0.99, 0.9]), indices=torch.tensor([1]))
    with pytest.raises(ValueError, match="weak_logits"):
        FreeMatchThreshold(3).update(_result([0], [0.99]))
    with pytest.raises(ValueError, match="weak_logits"):
        FreeMatchThreshold(3).update(_result([0], [0.99]), weak_logits=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="momentum"):
        FreeMatchThreshold(3, momentum=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        SoftMatchWeight(0)
    with pytest.raises(ValueError, match="n_sigma"):
        SoftMatchWeight(3, n_sigma=0)
    with pytest.raises(ValueError, match="num_unlabeled"):
        FlexMatchThreshold(3, 0)


def test_flexmatch_indices_outside_the_unlabeled_set_are_named():
    policy = FlexMatchThreshold(3, num_unlabeled=5)
    for bad in ([0, 5], [-1, 2]):
        with pytest.raises(ValueError, match=r"indices must be positions .* in \[0, num_unlabeled=5\)"):
            policy.update(_result([0, 1], [0.99, 0.99]), indices=torch.tensor(bad))
    assert policy.selected_label.tolist() == [-1] * 5  # nothing written
    with pytest.raises(TypeError, match="indices"):
        policy.update(_result([0], [0.99]), indices=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="result.labels"):
        policy.update(_result([3], [0.99]), indices=torch.tensor([1]))


def test_flexmatch_takes_int32_indices():
    policy = FlexMatchThreshold(3, num_unlabeled=5, threshold=0.9)
    policy.update(_result([2, 1], [0.95, 0.95]), indices=torch.tensor([4, 0], dtype=torch.int32))
    assert policy.selected_label.tolist() == [1, -1, -1, -1, 2]


POLICIES_WITH_C = {
    "flexmatch": lambda: FlexMatchThreshold(3, num_unlabeled=5),
    "freematch": lambda: FreeMatchThreshold(3),
    "softmatch": lambda: SoftMatchWeight(3),
}


@pytest.mark.parametrize("name", list(POLICIES_WITH_C))
@pytest.mark.parametrize("method", ["loss_kwargs", "forward", "update"])
def test_logits_of_another_class_count_are_refused_in_every_method(name, method):
    policy = POLICIES_WITH_C[name]()
    four = torch.randn(2, 4)
    call = {
        "loss_kwargs": lambda: policy.loss_kwargs(four),
        "forward": lambda: policy(four),
        "update": lambda: policy.update(_result([0, 1], [0.99, 0.99]), weak_logits=four, indices=torch.tensor([0, 1])),
    }[method]
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(ValueError, match=r"weak_logits must have 3 classes.*shape \(2, 4\)"):
        call()
    for k, v in policy.state_dict().items():
        assert torch.equal(v, state[k]), k  # refused before any state changed


# -- non-finite updates are refused before any state changes ---------------------------------
ALL_POLICIES = {"fixed": lambda: FixedThreshold(0.8), **POLICIES_WITH_C}


def _warmed(name):
    """A policy whose state has moved off its initial values (fresh random data, no zeros)."""
    policy = ALL_POLICIES[name]()
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        weak = 3 * torch.randn(4, 3, generator=g)
        out = select_pseudo_labels(weak, 0.5)
        policy.update(out, weak_logits=weak, indices=torch.randperm(5, generator=g)[:4])
    return policy, g


@pytest.mark.parametrize("name", list(ALL_POLICIES))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["weak_logits", "result.confidence"])
def test_a_non_finite_update_is_refused_and_the_state_kept(name, bad, where):
    policy, g = _warmed(name)
    weak = 3 * torch.randn(4, 3, generator=g)
    out = select_pseudo_labels(weak, 0.5)
    if where == "weak_logits":
        weak[1, 2] = bad
    else:
        out = out._replace(confidence=out.confidence.clone().index_fill_(0, torch.tensor([2]), bad))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{type(policy).__name__}\.update.*{where}.*NaN"):
        policy.update(out, weak_logits=weak, indices=torch.tensor([0, 1, 2, 3]))
    after = policy.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # and the next (finite) update goes on from the kept state, as it would have without the bad one
    good = select_pseudo_labels(weak.nan_to_num(0.0, 0.0, 0.0), 0.5)
    policy.update(good, weak_logits=weak.nan_to_num(0.0, 0.0, 0.0), indices=torch.tensor([0, 1, 2, 3]))
    assert all(torch.isfinite(v.double()).all() for v in policy.state_dict().values())


def test_freematch_after_a_refused_nan_update_matches_float64():
    # The case: one NaN in weak_logits made every class threshold NaN for good.
    policy, g = _warmed("freematch")
    time_p, p_model = policy.time_p.double().clone(), policy.p_model.double().clone()
    weak = 3 * torch.randn(4, 3, generator=g)
    poisoned = weak.clone()
    poisoned[0, 0] = math.nan
    with pytest.raises(ValueError, match="weak_logits"):
        policy.update(select_pseudo_labels(weak, 0.5), weak_logits=poisoned)
    policy.update(select_pseudo_labels(weak, 0.5), weak_logits=weak)
    m = policy.momentum
    probs = torch.softmax(weak.double(), -1)
    time_p = m * time_p + (1 - m) * probs.max(-1).values.mean()
    p_model = m * p_model + (1 - m) * probs.mean(0)
    torch.testing.assert_close(policy.time_p.double(), time_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(policy.class_thresholds().double(), time_p * p_model / p_model.max(),
                               rtol=1e-6, atol=1e-7)


def test_masked_classes_are_not_refused():
    # -inf marks a class that is ruled out (as the ops allow); only a row without a softmax is refused
    policy = FreeMatchThreshold(3)
    weak = torch.randn(2, 3)
    weak[0, 1] = -math.inf
    policy.update(select_pseudo_labels(weak, 0.5), weak_logits=weak)
    assert torch.isfinite(policy.p_model).all()
    weak[1] = -math.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        policy.update(SimpleNamespace(confidence=torch.tensor([0.9, 0.9])), weak_logits=weak)


@pytest.mark.parametrize("make, bad, error", [
    (lambda v: FixedThreshold(v), True, TypeError),
    (lambda v: FixedThreshold(v), "0.9", TypeError),
    (lambda v: FreeMatchThreshold(3, momentum=v), True, TypeError),
    (lambda v: SoftMatchWeight(3, n_sigma=v), math.inf, ValueError),
    (lambda v: SoftMatchWeight(3, lambda_max=v), "1", TypeError),
    (lambda v: FlexMatchThreshold(v, 5), 3.0, TypeError),
    (lambda v: FlexMatchThreshold(3, v), True, TypeError),
])
def test_settings_that_are_not_numbers_are_refused(make, bad, error):
    with pytest.raises(error):
        make(bad)
