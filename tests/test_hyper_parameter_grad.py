"""A hyper-parameter tensor that requires grad, on every fused op and every tensor
hyper-parameter: the kernels compute no gradient for it, so each op refuses it with an error
that names the argument (it was silently detached: a learnable temperature stayed put).

The same value detached, or the call under torch.no_grad(), runs; and the plain-PyTorch
definition in lepton_fast.reference, which the error points to, does give the gradient.
"""
import pytest
import torch

import lepton_fast as lf
from lepton_fast import reference


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kd(**kw):
    s = randn(4, 7, seed=1).requires_grad_()
    kw.setdefault("alpha", 0.3)
    return lf.fused_kd_loss(s, randn(4, 7, seed=2), labels=torch.tensor([0, 3, 6, 1]), divergence="jsd", **kw)


def _linear_kd(**kw):
    h = randn(4, 5, seed=3).requires_grad_()
    kw.setdefault("alpha", 0.3)
    return lf.fused_linear_kd_loss(h, randn(7, 5, seed=4), randn(4, 6, seed=5), randn(7, 6, seed=6),
                                   labels=torch.tensor([0, 3, 6, 1]), divergence="jsd", **kw)


def _select(**kw):
    return lf.select_pseudo_labels(randn(4, 7, seed=7), **kw).confidence


def _pseudo_loss(**kw):
    return lf.fused_pseudo_label_loss(randn(4, 7, seed=8).requires_grad_(), randn(4, 7, seed=9), soft=True,
                                      **kw).loss


def _fgsm(**kw):
    x = torch.rand(4, 7, generator=torch.Generator().manual_seed(10))
    kw.setdefault("eps", 0.03)
    return lf.fgsm_perturb(x, randn(4, 7, seed=11), **kw)


def _pgd(**kw):
    x = torch.rand(4, 7, generator=torch.Generator().manual_seed(12))
    kw.setdefault("step_size", 0.01)
    kw.setdefault("eps", 0.03)
    return lf.pgd_step(x, x, randn(4, 7, seed=13), **kw)


def _grad_reverse(**kw):
    return lf.grad_reverse(randn(4, 7, seed=14).requires_grad_(), **kw)


# (op, argument, its value: a number for a 0-d tensor, else a tensor of the shape it takes)
CASES = [
    (_kd, "temperature", 2.0), (_kd, "beta", 0.3), (_kd, "alpha", 0.3), (_kd, "label_smoothing", 0.1),
    (_linear_kd, "temperature", 2.0), (_linear_kd, "beta", 0.3), (_linear_kd, "alpha", 0.3),
    (_linear_kd, "label_smoothing", 0.1),
    (_select, "threshold", 0.5), (_select, "temperature", 0.5), (_select, "class_thresholds", torch.full((7,), 0.5)),
    (_pseudo_loss, "threshold", 0.5), (_pseudo_loss, "temperature", 0.5),
    (_pseudo_loss, "class_thresholds", torch.full((7,), 0.5)), (_pseudo_loss, "weights", torch.full((4,), 0.5)),
    (_fgsm, "eps", 0.03), (_fgsm, "eps", torch.full((4, 1), 0.03)), (_fgsm, "clamp", (0.0, 1.0)),
    (_pgd, "step_size", 0.01), (_pgd, "eps", 0.03), (_pgd, "eps", torch.full((4, 1), 0.03)),
    (_grad_reverse, "lambda_", 0.5),
]


def _tensor(value, requires_grad):
    if isinstance(value, tuple):
        return tuple(_tensor(v, requires_grad) for v in value)
    return torch.as_tensor(value, dtype=torch.float32).clone().requires_grad_(requires_grad)


def _ids(case):
    op, name, value = case
    shape = "" if not isinstance(value, torch.Tensor) else f"[{','.join(map(str, value.shape))}]"
    return f"{op.__name__.lstrip('_')}-{name}{shape}"


@pytest.mark.parametrize("op,name,value", CASES, ids=[_ids(c) for c in CASES])
def test_requires_grad_is_refused_naming_the_argument(op, name, value):
    named = "clamp\\[0\\]" if name == "clamp" else name  # a bound is named by its place
    with pytest.raises(ValueError, match=f"^{named} requires grad, .* pass {named}.detach()"):
        op(**{name: _tensor(value, True)})
    op(**{name: _tensor(value, True).detach() if not isinstance(value, tuple) else _tensor(value, False)})
    with torch.no_grad():  # nothing would be differentiated: nothing is dropped
        op(**{name: _tensor(value, True)})


def test_reference_differentiates_the_temperature():
    """The error's way out: reference.fused_kd_loss gives dL/dT, equal to a central difference
    in float64."""
    s, t = randn(4, 7, seed=1).double(), randn(4, 7, seed=2).double()
    temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    reference.fused_kd_loss(s, t, temperature).backward()
    h = 1e-6
    numeric = (reference.fused_kd_loss(s, t, 2.0 + h) - reference.fused_kd_loss(s, t, 2.0 - h)) / (2 * h)
    torch.testing.assert_close(temperature.grad, numeric, rtol=1e-6, atol=1e-9)
