"""grad_reverse and GradientReversal: identity forward without a copy, -lambda * grad backward,
and the DANN schedule (Ganin et al. 2016)."""
import math

import pytest
import torch

import lepton_fast
from lepton_fast import reference
from lepton_fast.nn import GradientReversal


def randn(shape, dtype, seed=0, **kw):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).requires_grad_(
        kw.get("requires_grad", False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (4, 7), (2, 3, 5, 5)], ids=["one-element", "features", "images"])
@pytest.mark.parametrize("lam", [1.0, 0.37, torch.tensor(0.37), torch.tensor(2.5, dtype=torch.float64)],
                         ids=["float-1", "float", "tensor", "tensor-f64"])
def test_forward_is_input_and_backward_is_negated(dtype, shape, lam):
    x = randn(shape, dtype, requires_grad=True)
    y = lepton_fast.grad_reverse(x, lam)
    assert y.data_ptr() == x.data_ptr() and y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, x)
    upstream = randn(shape, dtype, seed=1)  # grad_output != 1
    y.backward(upstream)
    lam_f = float(lam)
    assert x.grad.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(x.grad, -lam_f * upstream)
    exact = -lam_f * upstream.double()
    ref_err = (reference.grad_reverse_backward(upstream, lam_f).double() - exact).abs().max()
    assert (x.grad.double() - exact).abs().max() <= max(2 * ref_err, 1e-6 * exact.abs().max())


def test_float32_backward_is_exactly_minus_lambda_times_grad():
    x = randn((64,), torch.float32, requires_grad=True)
    upstream = randn((64,), torch.float32, seed=2)
    lepton_fast.grad_reverse(x, torch.tensor(0.3)).backward(upstream)
    assert torch.equal(x.grad, -(torch.tensor(0.3) * upstream))


def test_gradient_flows_through_a_network():
    torch.manual_seed(0)
    feat, head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 1)
    x = torch.randn(8, 5)
    head(feat(x)).sum().backward()
    plain = feat.weight.grad.clone()
    feat.zero_grad()
    head(lepton_fast.grad_reverse(feat(x), 0.5)).sum().backward()
    torch.testing.assert_close(feat.weight.grad, -0.5 * plain, rtol=1e-6, atol=1e-7)


def test_gradcheck_of_the_backward_op():
    # The layer itself is not a derivative (by design), so gradcheck the backward op, which
    # is linear in grad: its own backward (used by double backward) must be -lambda * gg.
    g = randn((3, 4), torch.float64, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.float64)
    op = torch.ops.lepton_fast.grad_reverse_backward
    assert torch.autograd.gradcheck(lambda t: op(t, lam), (g,))
    assert torch.autograd.gradgradcheck(lambda t: op(t * t, lam), (g,))


def test_double_backward_through_the_layer():
    x = randn((5,), torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad((lepton_fast.grad_reverse(x * x, 0.5)).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, -0.5 * 2 * x)  # d(x^2)/dx reversed
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    torch.testing.assert_close(ggx, torch.full_like(x, -1.0))


def test_opcheck_backward_op():
    grad = randn((3, 4), torch.float32)
    torch.library.opcheck(torch.ops.lepton_fast.grad_reverse_backward.default, (grad, torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.lepton_fast.grad_reverse_backward.default,
                          (randn((3, 4), torch.float64, requires_grad=True), torch.tensor(0.5, dtype=torch.float64)))


def test_torch_compile_fullgraph_tensor_lambda_does_not_recompile():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def f(x, lam):
        return (lepton_fast.grad_reverse(x, lam) * 2.0).sum()

    for i, lam in enumerate([0.1, 0.5, 0.9]):
        x = randn((4, 3), torch.float32, seed=i, requires_grad=True)
        f(x, torch.tensor(lam)).backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, -2.0 * lam))
    assert counter.frame_count == 1


def test_torch_compile_keeps_storage():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return lepton_fast.grad_reverse(x, 1.0)

    x = randn((4, 3), torch.float32)
    assert f(x).data_ptr() == x.data_ptr()


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([1.0],), TypeError, "x"),
        ((torch.zeros(2, dtype=torch.int64),), TypeError, "x"),
        ((torch.zeros(2), float("nan")), ValueError, "lambda_"),
        ((torch.zeros(2), "1"), TypeError, "lambda_"),
        ((torch.zeros(2), torch.ones(2)), ValueError, "lambda_"),
        ((torch.zeros(2), torch.tensor(1)), TypeError, "lambda_"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        lepton_fast.grad_reverse(*args)


# --- GradientReversal -------------------------------------------------------------------------

def dann(step, total, lo=0.0, hi=1.0, gamma=10.0):
    p = min(step / total, 1.0)
    return lo + (hi - lo) * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def test_dann_schedule_hand_computed():
    layer = GradientReversal(total_steps=100)
    assert float(layer.lambda_) == 0.0
    # p = 0.1: 2 / (1 + e^-1) - 1 = tanh(1/2)
    for _ in range(10):
        layer.step()
    assert float(layer.lambda_) == pytest.approx(math.tanh(0.5), abs=1e-7)
    for _ in range(40):
        layer.step()
    assert float(layer.lambda_) == pytest.approx(math.tanh(2.5), abs=1e-7)  # p = 0.5
    for _ in range(100):
        layer.step()
    assert float(layer.lambda_) == pytest.approx(math.tanh(5.0), abs=1e-7)  # p capped at 1
    shifted = GradientReversal(total_steps=10, lo=0.1, hi=0.5, gamma=3.0)
    for step in range(12):
        assert float(shifted.lambda_) == pytest.approx(dann(step, 10, 0.1, 0.5, 3.0), abs=1e-7)
        shifted.step()


def test_module_applies_its_current_lambda():
    layer = GradientReversal(total_steps=20)
    for _ in range(7):
        layer.step()
    x = randn((3, 2), torch.float32, requires_grad=True)
    y = layer(x)
    assert y.data_ptr() == x.data_ptr()
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, -dann(7, 20)), rtol=1e-6, atol=0)
    fixed = GradientReversal(0.25)
    x.grad = None
    fixed(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, -0.25))
    assert "lambda_=0.25" in repr(fixed) and "total_steps=20" in repr(layer)


def test_state_dict_round_trip_mid_schedule():
    layer = GradientReversal(total_steps=50)
    for _ in range(17):
        layer.step()
    state = layer.state_dict()
    assert int(state["step_count"]) == 17
    resumed = GradientReversal(total_steps=50)
    resumed.load_state_dict(state)
    assert float(resumed.lambda_) == float(layer.lambda_) == pytest.approx(dann(17, 50), abs=1e-7)
    resumed.step()
    assert float(resumed.lambda_) == pytest.approx(dann(18, 50), abs=1e-7)
    assert int(layer.step_count) == 17  # the copy advanced, not the original


def test_module_under_torch_compile_follows_the_schedule_without_recompiling():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    layer = GradientReversal(total_steps=10)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for step in range(3):
        x = randn((2, 2), torch.float32, seed=step, requires_grad=True)
        compiled(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, -dann(step, 10)), rtol=1e-6, atol=1e-7)
        layer.step()
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, lambda_=1.0), "either"),
        (dict(total_steps=10, gamma=-1.0), "gamma"),
        (dict(lambda_=float("inf")), "lambda_"),
    ],
)
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientReversal(**kwargs)
