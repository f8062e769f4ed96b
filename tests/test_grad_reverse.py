"""grad_reverse and GradientReversal: identity forward without a copy, -lambda * grad backward,
under eager autograd, torch.compile, torch.func transforms and their combinations, and the DANN
schedule (Ganin et al. 2016)."""
import functools
import math

import pytest
import torch
from torch.autograd import forward_ad

import lepton_fast
from lepton_fast.nn import GradientReversal


def randn(shape, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (4, 7), (2, 3, 5, 5)], ids=["one-element", "features", "images"])
@pytest.mark.parametrize("lam", [1.0, 0.37, torch.tensor(0.37), torch.tensor(2.5, dtype=torch.float64)],
                         ids=["float-1", "float", "tensor", "tensor-f64"])
def test_forward_is_input_and_backward_is_negated(dtype, shape, lam, device):
    x = randn(shape, dtype).to(device).requires_grad_()
    y = lepton_fast.grad_reverse(x, lam)
    assert y.data_ptr() == x.data_ptr() and y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, x)
    upstream = randn(shape, dtype, seed=1).to(device)  # grad_output != 1
    y.backward(upstream)
    assert x.grad.dtype == dtype
    # -lambda * grad, formed in x's dtype with lambda kept as the scalar it is (not rounded first)
    assert torch.equal(x.grad, upstream * -float(lam))


def test_gradient_flows_through_a_network():
    torch.manual_seed(0)
    feat, head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 1)
    x = torch.randn(8, 5)
    head(feat(x)).sum().backward()
    plain = feat.weight.grad.clone()
    feat.zero_grad()
    head(lepton_fast.grad_reverse(feat(x), 0.5)).sum().backward()
    torch.testing.assert_close(feat.weight.grad, -0.5 * plain, rtol=1e-6, atol=1e-7)


def test_double_backward_through_the_layer():
    x = randn((5,), torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad((lepton_fast.grad_reverse(x * x, 0.5)).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, -0.5 * 2 * x)  # d(x^2)/dx reversed
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    torch.testing.assert_close(ggx, torch.full_like(x, -1.0))


# --- every way of taking the gradient (issue 15 #4) --------------------------------------------

W = torch.arange(1.0, 5.0)


def loss(x, lam):
    return (W * lepton_fast.grad_reverse(x, lam)).sum()


def by_backward(fn):
    def run(x, lam):
        x = x.clone().requires_grad_()
        fn(x, lam).backward()
        return x.grad
    return run


def by_vjp(x, lam):
    _, pullback = torch.func.vjp(functools.partial(loss, lam=lam), x)
    return pullback(torch.tensor(1.0))[0]


def by_forward_ad(x, lam):
    """The directional derivatives along each basis vector: forward mode, outside torch.func."""
    with forward_ad.dual_level():
        rows = []
        for e in torch.eye(x.numel()):
            rows.append(forward_ad.unpack_dual(loss(forward_ad.make_dual(x, e), lam)).tangent)
    return torch.stack(rows)


WAYS = {
    "eager backward": lambda: by_backward(loss),
    "torch.compile backward": lambda: by_backward(torch.compile(loss, fullgraph=True)),
    "func.grad": lambda: torch.func.grad(loss),
    "compile(func.grad)": lambda: torch.compile(torch.func.grad(loss), fullgraph=True),  # the case
    # Dynamo cannot trace a compiled function under an eager transform: it runs it eagerly
    # (with fullgraph=True torch refuses, see test_func_grad_of_a_fullgraph_compile_refuses)
    "func.grad(compile)": lambda: torch.func.grad(torch.compile(loss)),
    "func.vjp": lambda: by_vjp,
    "func.jacrev": lambda: torch.func.jacrev(loss),
    "func.jacfwd": lambda: torch.func.jacfwd(loss),
    "compile(func.jacrev)": lambda: torch.compile(torch.func.jacrev(loss), fullgraph=True),
    "vmap(func.grad)": lambda: lambda x, lam: torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(
        torch.stack([x, 2 * x]), lam)[1],
    "compile(vmap(func.grad))": lambda: lambda x, lam: torch.compile(
        torch.func.vmap(torch.func.grad(loss), in_dims=(0, None)), fullgraph=True)(torch.stack([x, 2 * x]), lam)[1],
    "forward AD": lambda: by_forward_ad,
}


@pytest.mark.parametrize("lam", [0.5, torch.tensor(0.5)], ids=["float", "tensor"])
@pytest.mark.parametrize("way", WAYS.values(), ids=WAYS.keys())
def test_every_way_of_differentiating_reverses(way, lam):
    """compiled torch.func.grad gave [1, 2, 3, 4] instead of [-0.5, -1, -1.5, -2]."""
    torch._dynamo.reset()
    x = randn((4,), torch.float32, seed=3)
    torch.testing.assert_close(way()(x, lam), -0.5 * W, rtol=0, atol=0)


def test_func_grad_of_a_fullgraph_compile_refuses():
    """A combination torch itself does not support: loud, never a silent unreversed gradient."""
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch.func.grad"):
        torch.func.grad(torch.compile(loss, fullgraph=True))(randn((4,), torch.float32), 0.5)


@pytest.mark.parametrize("way", ["torch.compile backward", "compile(func.grad)"])
def test_a_changing_lambda_does_not_recompile(way):
    """A schedule changes lambda every step: one graph after the first specialisation of a
    float, one graph for a 0-d tensor. (torch.func.grad specialises the float arguments of the
    function it wraps, in torch's own wrapper: there a schedule passes lambda as a tensor.)"""
    from torch._dynamo.utils import counters

    x = randn((4,), torch.float32, seed=4)
    kinds = (float, torch.tensor) if way == "torch.compile backward" else (torch.tensor,)
    for kind in kinds:
        torch._dynamo.reset()
        counters.clear()
        compiled = WAYS[way]()
        for lam in (0.1, 0.4, 0.7, 0.9):
            torch.testing.assert_close(compiled(x, kind(lam)), -lam * W)
        assert counters["stats"]["unique_graphs"] <= (2 if kind is float else 1), counters["stats"]


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


@pytest.mark.parametrize("requires_grad", [False, True])
def test_torch_compile_keeps_storage(requires_grad):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return lepton_fast.grad_reverse(x, 1.0)

    x = randn((4, 3), torch.float32, requires_grad=requires_grad)
    assert f(x).data_ptr() == x.data_ptr()


def test_inside_a_transform_the_value_is_the_input_even_where_infinite():
    """The op form's x + (t - t.detach()) would give NaN where t is inf; those elements keep x."""
    x = torch.tensor([1.0, float("inf"), -float("inf"), 2.0])
    values = torch.func.vmap(lambda v: lepton_fast.grad_reverse(v, 0.5))(x.view(4, 1)).view(4)
    assert torch.equal(values, x)
    grad = torch.func.grad(lambda v: (lepton_fast.grad_reverse(v, 0.5) * W).sum())(x.nan_to_num(posinf=3.0))
    torch.testing.assert_close(grad, -0.5 * W)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([1.0],), TypeError, "x"),
        ((torch.zeros(2, dtype=torch.int64),), TypeError, "x"),
        ((torch.zeros(2), float("nan")), ValueError, "lambda_"),
        ((torch.zeros(2), torch.tensor(float("inf"))), ValueError, "lambda_"),
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


def applied_lambda(layer):
    """The lambda the layer applies, read off its gradient (not off the module's attributes)."""
    x = torch.zeros(1, requires_grad=True)
    layer(x).sum().backward()
    return -x.grad.item()


def test_dann_schedule_hand_computed():
    layer = GradientReversal(total_steps=100)
    assert applied_lambda(layer) == 0.0
    # p = 0.1: 2 / (1 + e^-1) - 1 = tanh(1/2)
    for _ in range(10):
        layer.step()
    assert applied_lambda(layer) == pytest.approx(math.tanh(0.5), abs=1e-7)
    for _ in range(40):
        layer.step()
    assert applied_lambda(layer) == pytest.approx(math.tanh(2.5), abs=1e-7)  # p = 0.5
    for _ in range(100):
        layer.step()
    assert applied_lambda(layer) == pytest.approx(math.tanh(5.0), abs=1e-7)  # p capped at 1
    shifted = GradientReversal(total_steps=10, lo=0.1, hi=0.5, gamma=3.0)
    for step in range(12):
        assert applied_lambda(shifted) == pytest.approx(dann(step, 10, 0.1, 0.5, 3.0), abs=1e-7)
        shifted.step()


def test_state_dict_round_trip_mid_schedule():
    layer = GradientReversal(total_steps=50)
    for _ in range(17):
        layer.step()
    state = layer.state_dict()
    assert int(state["step_count"]) == 17
    resumed = GradientReversal(total_steps=50)
    resumed.load_state_dict(state)
    assert applied_lambda(resumed) == applied_lambda(layer) == pytest.approx(dann(17, 50), abs=1e-7)
    assert float(resumed.lambda_) == float(layer.lambda_) == pytest.approx(dann(17, 50), abs=1e-7)
    resumed.step()
    assert applied_lambda(resumed) == pytest.approx(dann(18, 50), abs=1e-7)
    assert float(resumed.lambda_) == pytest.approx(dann(18, 50), abs=1e-7)
    assert int(layer.step_count) == 17  # the copy advanced, not the original


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


def test_module_under_compiled_func_grad():
    """The module with its schedule, through the issue's combination."""
    layer = GradientReversal(total_steps=10)
    compiled = torch.compile(torch.func.grad(lambda x: (W * layer(x)).sum()), fullgraph=True)
    x = randn((4,), torch.float32, seed=5)
    for step in range(3):
        torch.testing.assert_close(compiled(x), -dann(step, 10) * W, rtol=1e-6, atol=1e-7)
        layer.step()


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
