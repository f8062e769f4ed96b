"""fused_pseudo_label_loss on every kernel (CPU C++, CUDA C++, Triton) and the reference,
against reference.py in float64.

Inputs are fresh random logits (seeded per test); conftest fills every new buffer with NaN,
so an element a kernel forgets to write shows. Pseudo-labels, masks and class counts must be
equal to the oracle's, confidences within 1e-5; float32 losses and gradients within 1e-5
(abs and rel) of the float64 reference; bfloat16/float16 gradients within 2x the error of
the reference run in that same dtype. Cases marked `cuda` run the CUDA C++ and the compiled
Triton kernel on a GPU; without one, the Triton kernel runs on CPU tensors in Triton's
interpreter.
"""
import math
import re
import textwrap

import pytest
import torch

from conftest import (CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, TEMPERATURES, TRITON_COLUMN_BLOCKS, interpreted,
                      low_precision_tolerance, opcheck_kernel, require, run_on_each_cpu_capability,
                      temperature_sweep_logits)
from lepton_fast import _backend, fused_pseudo_label_loss, reference
from lepton_fast.ops.pseudo_labels import LOSS_SPEC as SPEC

# The interpreter evaluates both sides of tl.where with numpy, which warns about the
# -inf - -inf of masked lanes on the side that is thrown away.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
# The kernels and the reference, which is the fallback users get and must agree too.
BACKENDS = DEVICE_BACKENDS
LOW = (torch.bfloat16, torch.float16)
TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def views(*shape, seed, dtype=torch.float32, device="cpu"):
    """(strong, weak): the weak view spread widely enough that a threshold of 0.5 selects
    some rows and leaves out others."""
    return randn(*shape, seed=seed, dtype=dtype, device=device), \
        randn(*shape, seed=seed + 1, dtype=dtype, device=device, scale=3.0)


def extras(kind, shape, seed, device="cpu"):
    """The keyword arguments of one way of choosing rows."""
    g = torch.Generator().manual_seed(seed)
    if kind == "threshold":
        return dict(threshold=0.5)
    if kind == "temperature":  # T < 1 sharpens the weak view: more rows pass
        return dict(threshold=0.7, temperature=0.5)
    if kind == "class_thresholds":
        return dict(class_thresholds=(torch.rand(shape[-1], generator=g) * 0.8).to(device))
    w = torch.rand(shape[:-1], generator=g)
    return dict(weights=torch.where(w < 0.3, 0.0, w).to(device))  # some rows left out by a zero weight


def ours(backend, strong, weak, grad_output=None, **kw):
    s = strong.detach().clone().requires_grad_()
    out = fused_pseudo_label_loss(s, weak, backend=backend, **kw)
    out.loss.backward(torch.ones_like(out.loss) if grad_output is None else grad_output)
    return out, s.grad


def oracle(strong, weak, grad_output=None, **kw):
    """reference.py in float64 on the same (already rounded) values: (outputs, gradient)."""
    kw = {k: v.double() if k == "weights" else v for k, v in kw.items()}
    s = strong.detach().double().requires_grad_()
    out = reference.fused_pseudo_label_loss(s, weak.double(), **kw)
    out[0].backward(torch.ones_like(out[0]) if grad_output is None else grad_output.double())
    return out, s.grad


def low_precision_reference(strong, weak, **kw):
    s = strong.detach().clone().requires_grad_()
    loss = reference.fused_pseudo_label_loss(s, weak, **kw)[0]
    loss.backward(torch.ones_like(loss))
    return s.grad


def assert_matches(backend, strong, weak, grad_output=None, **kw):
    out, grad = ours(backend, strong, weak, grad_output, **kw)
    (loss, labels, confidence, mask, counts), ref_grad = oracle(strong, weak, grad_output, **kw)
    acc = torch.float64 if strong.dtype == torch.float64 else torch.float32
    assert out.loss.dtype == out.confidence.dtype == acc
    assert grad.dtype == strong.dtype and grad.shape == strong.shape
    assert torch.equal(out.labels.cpu(), labels.cpu()) and torch.equal(out.mask.cpu(), mask.cpu())
    assert torch.equal(out.class_counts.cpu(), counts.cpu())
    torch.testing.assert_close(out.confidence.double(), confidence, **TOL)
    torch.testing.assert_close(out.loss.double(), loss, **TOL)
    if strong.dtype in LOW:
        ref_err = (low_precision_reference(strong, weak, **kw).double() - ref_grad).abs().max().item()
        err = (grad.double() - ref_grad).abs().max().item()
        assert err <= low_precision_tolerance(strong.dtype, ref_err, backend, ref_grad.abs().max().item()), \
            (err, ref_err)
    else:
        torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    return out, grad


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("rows", ["threshold", "temperature", "class_thresholds", "weights"])
def test_every_mode_float32(rows, soft, device, backend):
    require(SPEC, device, backend)
    # C = 37: not a multiple of any vector width, so every row has a tail.
    s, w = views(6, 37, seed=1, device=device)
    assert_matches(backend, s, w, soft=soft, **extras(rows, (6, 37), seed=2, device=device))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_range(temperature, soft, device, backend):
    """Every T of the documented range (1e-8 ... 1e4) agrees with the float64 oracle: labels,
    masks, confidences (never above 1), the soft target's loss and gradient."""
    require(SPEC, device, backend)
    s = temperature_sweep_logits((6, 37), temperature, seed=31, device=device)
    w = temperature_sweep_logits((6, 37), temperature, seed=32, device=device)
    out, _ = assert_matches(backend, s, w, soft=soft, threshold=0.5, temperature=temperature)
    assert bool((out.confidence <= 1).all()), out.confidence


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_reductions_with_grad_output(reduction, device, backend):
    # The backward scales the saved gradient: by a 0-d grad_output != 1, or per row ("none").
    require(SPEC, device, backend)
    s, w = views(3, 4, 13, seed=3, device=device)
    grad_output = randn(*((3, 4) if reduction == "none" else ()), seed=4, device=device)
    out, _ = assert_matches(backend, s, w, grad_output, threshold=0.4, reduction=reduction)
    assert out.loss.shape == ((3, 4) if reduction == "none" else ())
    assert out.labels.shape == out.confidence.shape == out.mask.shape == (3, 4)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_other_dtypes(soft, dtype, device, backend):
    require(SPEC, device, backend)
    # C = 300: several vectors of every width, and a tail.
    s, w = views(8, 300, seed=5, dtype=dtype, device=device)
    assert_matches(backend, s, w, soft=soft, threshold=0.3, temperature=0.5,
                   weights=extras("weights", (8, 300), seed=6, device=device)["weights"])


def _shapes():
    yield pytest.param((1, 50), id="N=1")
    yield pytest.param((9, 1), id="C=1: confidence 1, loss 0")
    yield pytest.param((2, 3, 40), id="[B,T,C] leading dims")
    yield pytest.param((0, 17), id="N=0: an empty batch, loss 0")
    yield pytest.param((5, 1100), id="C=1100: more than one CPU chunk (64 vectors), ragged")
    yield pytest.param((3, 4099), id="C=4099: one column more than Triton's widest block")
    yield pytest.param((2, 50257), id="C=50257 GPT-2 vocabulary, odd: no GPU vector path")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", list(_shapes()))
def test_shapes(shape, soft, device, backend):
    require(SPEC, device, backend)
    if interpreted(device, backend) and shape[-1] > 2000:
        pytest.skip("wide rows take minutes in Triton's interpreter; the compiled kernels cover them")
    s, w = views(*shape, seed=7, device=device)
    for reduction in ("mean", "none"):
        out, _ = assert_matches(backend, s, w, soft=soft, threshold=0.2, reduction=reduction)
        assert out.loss.shape == (shape[:-1] if reduction == "none" else ())


# The CPU kernel writes a gradient of 32 MiB or more around the caches (non-temporal stores,
# on vector-aligned addresses), zero-weight rows included.
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", [
    pytest.param((8192, 1024), id="every row aligned: all streamed"),
    pytest.param((8193, 1025), id="odd C: one row in 16 streamed, the others stored"),
])
def test_gradient_past_the_streaming_size(shape, soft):
    require(SPEC, "cpu", "cpu")
    assert shape[0] * shape[1] * 4 >= 32 << 20
    s, w = views(*shape, seed=41)
    assert_matches("cpu", s, w, soft=soft, threshold=0.2, weights=extras("weights", shape, seed=42)["weights"])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "sliced", "unaligned"])
def test_non_contiguous(view, device, backend):
    require(SPEC, device, backend)
    if view == "transposed":  # [C, N] storage seen as [N, C]: stride along C is not 1
        s, w = views(40, 6, seed=8, device=device)
        s, w = s.t(), w.t()
    elif view == "sliced":  # every other row and a window of classes: row stride != C
        s, w = views(12, 60, seed=8, device=device)
        s, w = s[::2, 5:45], w[::2, 5:45]
    else:  # rows start one element in: not 16-byte aligned, the GPU kernels' scalar path
        s, w = views(6, 41, seed=8, device=device)
        s, w = s[:, 1:], w[:, 1:]
    assert_matches(backend, s, w, soft=True, threshold=0.3)
    assert_matches(backend, s, w.flip(0), threshold=0.3)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_neg_inf_masks(soft, device, backend):
    # -inf logits rule classes out, in both views, at column 0 (a row starts at -inf) and in a
    # whole block: finite loss and zero gradient there.
    require(SPEC, device, backend)
    s, w = views(5, 70, seed=9)
    s[:, ::7], w[:, ::7] = -math.inf, -math.inf
    s[0, 16:32], w[0, 16:32] = -math.inf, -math.inf
    w[:, 3::11] = -math.inf  # the weak view alone rules classes out: they add nothing to a soft target
    out, grad = assert_matches(backend, s.to(device), w.to(device), soft=soft, threshold=0.2)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad[:, ::7] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("how", ["threshold", "zero_weights"])
def test_rows_left_out_may_hold_anything(how, soft, device, backend):
    require(SPEC, device, backend)
    s, w = views(5, 7, seed=10)
    s[0] = -math.inf  # a left-out row's strong view is never read: even an undefined softmax
    s[1, 2] = math.nan
    kw = dict(threshold=1.0) if how == "threshold" else dict(threshold=0.0, weights=torch.zeros(5, device=device))
    out, grad = ours(backend, s.to(device), w.to(device), soft=soft, **kw)
    assert out.loss.item() == 0.0 and (grad == 0).all()
    assert not out.mask.any() if how == "threshold" else out.mask.all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_confidence_equal_to_threshold_is_selected(device, backend):
    # Equal logits give confidence exactly 1/C, so the comparison is exact (>=, as FixMatch);
    # 0.5 + 2**-24 is the next float32 above 0.5.
    require(SPEC, device, backend)
    weak = torch.tensor([[0.0, 0.0], [3.0, 3.0]], device=device)
    strong = randn(2, 2, seed=11, device=device)
    assert fused_pseudo_label_loss(strong, weak, threshold=0.5, backend=backend).mask.all()
    assert not fused_pseudo_label_loss(strong, weak, threshold=0.5 + 2**-24, backend=backend).mask.any()
    ct = torch.tensor([0.5, 0.9], device=device)  # the label of an all-equal row is 0
    assert fused_pseudo_label_loss(strong, weak, class_thresholds=ct, backend=backend).mask.all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_every_row_selected_is_cross_entropy(device, backend):
    require(SPEC, device, backend)
    s, w = views(8, 10, seed=12, device=device)
    out, grad = ours(backend, s, w, threshold=0.0)
    x = s.double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x, w.argmax(-1))
    expected.backward()
    assert out.mask.all() and out.class_counts.sum() == 8
    torch.testing.assert_close(out.loss.double(), expected.detach(), **TOL)
    torch.testing.assert_close(grad.double(), x.grad, **TOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_weak_view_of_another_dtype_is_read_as_given(device, backend):
    # A float32 weak view is never rounded to a bfloat16 strong view's precision: the
    # pseudo-labels and confidences are those of the values given.
    require(SPEC, device, backend)
    s = randn(8, 64, seed=13, dtype=torch.bfloat16, device=device)
    w = randn(8, 64, seed=14, device=device, scale=3.0) + 20
    out, grad = ours(backend, s, w, threshold=0.3, soft=True)
    (loss, labels, confidence, mask, _), ref_grad = oracle(s, w, threshold=0.3, soft=True)
    assert torch.equal(out.labels.cpu(), labels.cpu()) and torch.equal(out.mask.cpu(), mask.cpu())
    torch.testing.assert_close(out.confidence.double(), confidence, **TOL)
    torch.testing.assert_close(out.loss.double(), loss, **TOL)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref_grad, atol=2**-8 * ref_grad.abs().max().item(), rtol=0)


def test_class_counts_and_no_grad_to_weak():
    s, w = views(50, 6, seed=15)
    w.requires_grad_()
    out = fused_pseudo_label_loss(s.requires_grad_(), w, threshold=0.6)
    assert torch.equal(out.class_counts, torch.bincount(out.labels[out.mask], minlength=6))
    out.loss.backward()
    assert w.grad is None and not out.confidence.requires_grad


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_float64(device, backend):
    require(SPEC, device, backend)
    if backend != _backend.default(SPEC, device):  # (without the extension, the reference kernel is the default)
        pytest.skip("gradcheck backpropagates repeatedly through one graph: compiled with the default kernel only")
    s, w = views(3, 5, seed=16, dtype=torch.float64, device=device)
    weights = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64, device=device)
    torch.compiler.reset()
    for soft in (False, True):
        # gradcheck runs several backwards through one graph, which the eager op refuses (its
        # backward scales the saved gradient in place); traced by AOTAutograd the backward is
        # functional, and the forward still the kernel.
        fn = torch.compile(lambda x: fused_pseudo_label_loss(x, w, soft=soft, weights=weights, backend=backend).loss,
                           backend="aot_eager", fullgraph=True)
        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def _op_args(device, requires_grad):
    s, w = views(4, 19, seed=17, device=device)
    s.requires_grad_(requires_grad)
    g = torch.Generator().manual_seed(18)
    ct = torch.rand(19, generator=g).to(device)
    weights = torch.rand(4, generator=g).to(device)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731  # hyper-parameters: 0-d CPU float64
    return [
        (s, w, f64(0.5), f64(1.0), False, None, None, "mean", requires_grad),
        (s, w, f64(0.5), f64(2.0), True, ct, weights, "none", requires_grad),
        (s, w, f64(0.2), f64(0.5), False, ct, None, "sum", requires_grad),
    ]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    """The schema, fake kernel, autograd registration and AOT dispatch of every kernel."""
    require(SPEC, device, backend)
    opcheck_kernel(SPEC, device, backend, _op_args(device, True) + _op_args(device, False))


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    require(SPEC, device, device)
    torch._dynamo.reset()
    s, w = views(2, 3, 41, seed=19, device=device)
    ct = torch.full((41,), 0.3, device=device)

    def step(x):
        out = fused_pseudo_label_loss(x, w, soft=True, class_thresholds=ct)
        return out.loss * 2, out.class_counts, out.mask

    compiled = torch.compile(step, fullgraph=True)
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, counts, mask = compiled(x1)
    loss.backward()
    eager_loss, eager_counts, eager_mask = step(x2)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, **TOL)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    assert torch.equal(counts, eager_counts) and torch.equal(mask, eager_mask)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_changing_hyper_parameters_do_not_recompile(device):
    """Threshold schedules (FlexMatch warm-up, curricula) and temperatures change every step:
    one graph after the first specialisation, right values, no graph break."""
    from torch._dynamo.utils import counters

    require(SPEC, device, device)
    torch._dynamo.reset()
    counters.clear()
    s, w = views(6, 30, seed=20, device=device)
    compiled = torch.compile(lambda x, tau, T: fused_pseudo_label_loss(x, w, tau, T, soft=True).loss,
                             fullgraph=True)
    for step in range(5):
        tau, T = 0.2 + 0.1 * step, 0.5 + 0.25 * step
        got = compiled(s, tau, T)
        want = reference.fused_pseudo_label_loss(s.double(), w.double(), tau, T, soft=True)[0]
        torch.testing.assert_close(got.double(), want, **TOL)
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]
    with pytest.raises(Exception, match="threshold"):
        compiled(s, 1.5, 1.0)


BAD_INPUTS = [
    ("weak shape", dict(weak=randn(4, 6, seed=0)), ValueError, "weak_logits"),
    ("int strong", dict(strong=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "strong_logits"),
    ("int weak", dict(weak=torch.zeros(4, 5, dtype=torch.int32)), TypeError, "weak_logits"),
    ("threshold > 1", dict(threshold=1.5), ValueError, "threshold"),
    ("threshold < 0", dict(threshold=-0.1), ValueError, "threshold"),
    ("threshold nan", dict(threshold=math.nan), ValueError, "threshold"),
    ("threshold str", dict(threshold="0.9"), TypeError, "threshold"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature inf", dict(temperature=math.inf), ValueError, "temperature"),
    ("temperature [2]", dict(temperature=torch.ones(2)), ValueError, "temperature"),
    ("class_thresholds shape", dict(class_thresholds=torch.full((4,), 0.5)), ValueError, "class_thresholds"),
    ("class_thresholds > 1", dict(class_thresholds=torch.full((5,), 1.5)), ValueError, "class_thresholds"),
    ("weights shape", dict(weights=torch.ones(5)), ValueError, "weights"),
    ("weights [4,1]", dict(weights=torch.ones(4, 1)), ValueError, "weights"),
    ("weights < 0", dict(weights=-torch.ones(4)), ValueError, "weights"),
    ("weights inf", dict(weights=torch.full((4,), math.inf)), ValueError, "weights"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("what,change,error,name", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, change, error, name, backend):
    require(SPEC, "cpu", backend)
    kw = dict(strong=randn(4, 5, seed=21), weak=randn(4, 5, seed=22))
    kw.update(change)
    with pytest.raises(error, match=name):
        fused_pseudo_label_loss(kw.pop("strong"), kw.pop("weak"), backend=backend, **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("which,bad", [("weak_logits", -math.inf), ("weak_logits", math.nan),
                                       ("strong_logits", -math.inf), ("strong_logits", math.nan)])
def test_undefined_row_is_an_error(which, bad, backend):
    require(SPEC, "cpu", backend)
    s, w = views(3, 10, seed=23)
    (w if which == "weak_logits" else s)[1] = bad
    with pytest.raises(ValueError, match=which):
        fused_pseudo_label_loss(s, w, threshold=0.0, backend=backend)  # every row selected: the strong row counts


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_second_backward_raises(device, backend):
    require(SPEC, device, backend)
    s, w = views(3, 10, seed=24, device=device)
    loss = fused_pseudo_label_loss(s.requires_grad_(), w, threshold=0.0, backend=backend).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_second_order_gradient_raises_and_names_the_reference(device, backend):
    """A MAML-style inner step differentiates the gradient again: every kernel refuses (its
    gradient is a constant) and names lepton_fast.reference's function, which gives it."""
    require(SPEC, device, backend)
    x, w = randn(5, 6, seed=25, device=device), randn(5, 9, seed=26, device=device, scale=3.0)
    w0 = randn(9, 6, seed=27, device=device, scale=0.5)

    def outer_grad(loss_fn, dtype, **kw):
        weight = w0.to(dtype).clone().requires_grad_()
        loss = loss_fn(x.to(dtype) @ weight.T, w.to(dtype), 0.0, soft=True, **kw)[0]
        (g,) = torch.autograd.grad(loss, weight, create_graph=True)
        (outer,) = torch.autograd.grad((weight - 0.1 * g).square().sum(), weight)
        return outer

    for chosen in (backend, "reference"):
        with pytest.raises(RuntimeError, match=r"second-order.*lepton_fast\.reference\.fused_pseudo_label_loss"):
            outer_grad(fused_pseudo_label_loss, torch.float32, backend=chosen)
    torch.testing.assert_close(outer_grad(reference.fused_pseudo_label_loss, torch.float32).double(),
                               outer_grad(reference.fused_pseudo_label_loss, torch.float64), **TOL)


def test_other_cpu_instruction_sets():
    """The row kernel is compiled for the portable baseline, AVX2 and AVX-512 and follows
    ATen's choice; ATEN_CPU_CAPABILITY lowers it, so this machine runs the other builds too."""
    require(SPEC, "cpu", "cpu")
    script = textwrap.dedent("""
        import itertools, torch
        from lepton_fast import _backend, fused_pseudo_label_loss, reference
        print(torch.backends.cpu.get_cpu_capability())
        g = torch.Generator().manual_seed(0)
        for dtype, soft in itertools.product([torch.float32, torch.bfloat16, torch.float64], [False, True]):
            s = torch.randn(7, 1100, generator=g).to(dtype)  # more than one chunk, a ragged tail
            w = (torch.randn(7, 1100, generator=g) * 3).to(dtype)
            w[:, ::9] = float("-inf"); s[:, ::9] = float("-inf")
            w[0, [5, 700]] = 50.0  # a tie in two chunks: the first wins
            kw = dict(threshold=0.2, temperature=0.5, soft=soft, reduction="none")
            x = s.clone().requires_grad_(); out = fused_pseudo_label_loss(x, w, backend="cpu", **kw)
            out.loss.sum().backward()
            xr = s.double().requires_grad_(); ref = reference.fused_pseudo_label_loss(xr, w.double(), **kw)
            ref[0].sum().backward()
            assert torch.equal(out.labels, ref[1]) and torch.equal(out.mask, ref[3]) and out.labels[0] == 5
            tol = 1e-5 if dtype != torch.bfloat16 else 1e-2
            torch.testing.assert_close(out.loss.double(), ref[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.grad.double(), xr.grad, atol=tol, rtol=tol)
        print("ok")
    """)
    run_on_each_cpu_capability(script)


# --- Triton's column blocks: every boundary case, with a small block so that it shows --------


@TRITON_COLUMN_BLOCKS
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_triton_column_blocks(n, c, block, soft):
    require(SPEC, "cpu", "triton")
    from lepton_fast.kernels.pseudo_labels import fused_pseudo_label_loss as triton_loss

    s, w = views(n, c, seed=28)
    w[0, [c // 3, c - 1]] = 20.0  # a tie across blocks: the first wins
    weights = torch.tensor([1.0, 0.0, 0.5][:n])
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, grad, labels, confidence, mask, counts = triton_loss(s, w, f64(0.1), f64(2.0), soft, None, weights, "sum",
                                                               True, block=block)
    (ref_loss, ref_labels, ref_confidence, ref_mask, ref_counts), ref_grad = oracle(
        s, w, threshold=0.1, temperature=2.0, soft=soft, weights=weights, reduction="sum")
    assert torch.equal(labels, ref_labels) and torch.equal(mask, ref_mask) and torch.equal(counts, ref_counts)
    torch.testing.assert_close(confidence.double(), ref_confidence, **TOL)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_row_with_no_softmax_reads_the_same_on_every_cpu_kernel(reduction, device, backend):
    """An undefined weak or strong row (entirely -inf, or a NaN in it): every kernel names the
    op, the row and the argument in the same words, whatever the reduction."""
    require(SPEC, device, backend)
    g = torch.Generator().manual_seed(7)
    strong, weak = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    # Entirely -inf, or one NaN: the CPU kernels' running max dropped a NaN (a loss of +inf).
    for name, fill in (("weak_logits", "-inf"), ("strong_logits", "-inf"), ("weak_logits", "nan"),
                       ("strong_logits", "nan")):
        bad = (weak if name == "weak_logits" else strong).clone()
        if fill == "-inf":
            bad[2] = -math.inf
        else:
            bad[2, 3] = math.nan
        args = (strong, bad) if name == "weak_logits" else (bad, weak)
        with pytest.raises(ValueError, match=re.escape(
                f"fused_pseudo_label_loss: row 2 of {name} is entirely -inf, or holds +inf or NaN, so its softmax "
                "is undefined") + "$"):
            fused_pseudo_label_loss(*args, threshold=0.0, reduction=reduction, backend=backend)

