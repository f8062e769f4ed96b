"""select_pseudo_labels and fused_pseudo_label_loss against reference.py run in float64."""

import pytest
import torch
import torch.nn.functional as F

from lepton_fast import fused_pseudo_label_loss, reference, select_pseudo_labels
from lepton_fast.ops import pseudo_labels as op
from conftest import compiled_backends, low_precision_tolerance

BACKENDS = ["reference"] + compiled_backends(op.LOSS_SPEC, "cpu")
KERNELS = [b for b in BACKENDS if b != "reference"]
LOW = [torch.bfloat16, torch.float16]

SHAPES = {
    "rows": (6, 37),  # C not a multiple of the 8 SIMD lanes: exercises the tails
    "lead": (2, 3, 11),  # leading dims [..., C]
    "one_row": (1, 9),
    "wide": (3, 4099),  # > one Triton block of 4096 columns
}


def _randn(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _views(shape, dtype, seed=0):
    """Weak logits spread widely enough that some rows pass a 0.5 threshold and some do not."""
    return _randn(shape, dtype, 1.0, seed), _randn(shape, dtype, 3.0, seed + 1)


def _loss_and_grad(strong, weak, grad_output=None, **kw):
    strong = strong.detach().clone().requires_grad_()
    out = fused_pseudo_label_loss(strong, weak, **kw)
    out.loss.backward(torch.ones_like(out.loss) if grad_output is None else grad_output)
    return out, strong.grad


def _oracle(strong, weak, grad_output=None, **kw):
    """reference.py in float64 on the same (possibly low-precision) values."""
    weights, ct = kw.pop("weights", None), kw.pop("class_thresholds", None)
    s64 = strong.detach().double().requires_grad_()
    loss, labels, conf, mask, counts = reference.fused_pseudo_label_loss(
        s64, weak.double(), class_thresholds=ct, weights=None if weights is None else weights.double(), **kw
    )
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.double())
    return (loss, labels, conf, mask, counts), s64.grad


def _low_precision_reference(strong, weak, grad_output=None, **kw):
    strong = strong.detach().clone().requires_grad_()
    loss, *_ = reference.fused_pseudo_label_loss(strong, weak, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss, strong.grad


def _assert_loss_matches(strong, weak, backend, grad_output=None, **kw):
    out, grad = _loss_and_grad(strong, weak, grad_output, backend=backend, **kw)
    (loss, labels, conf, mask, counts), grad64 = _oracle(strong, weak, grad_output, **dict(kw))
    assert torch.equal(out.labels, labels) and torch.equal(out.mask, mask)
    assert torch.equal(out.class_counts, counts)
    assert out.confidence.dtype == torch.promote_types(strong.dtype, torch.float32)
    assert (out.confidence.double() - conf).abs().max() <= 1e-5
    assert out.loss.dtype == torch.promote_types(strong.dtype, torch.float32)
    assert grad.dtype == strong.dtype and grad.shape == strong.shape
    loss_err = (out.loss.double() - loss).abs().max().item()
    grad_err = (grad.double() - grad64).abs().max().item()
    if strong.dtype in LOW:
        ref_loss, ref_grad = _low_precision_reference(strong, weak, grad_output, **kw)
        loss_tol = low_precision_tolerance(strong.dtype, (ref_loss.double() - loss).abs().max().item(), backend, 0.0)
        grad_tol = low_precision_tolerance(strong.dtype, (ref_grad.double() - grad64).abs().max().item(), backend,
                              grad64.abs().max().item())
    else:
        loss_tol = 1e-5 * max(1.0, loss.abs().max().item())
        grad_tol = 1e-5
    assert loss_err <= loss_tol, (loss_err, loss_tol)
    assert grad_err <= grad_tol, (grad_err, grad_tol)
    return out


VARIANTS = {
    "threshold": dict(threshold=0.5),
    "temperature": dict(threshold=0.7, temperature=0.5),
    "class_thresholds": dict(class_thresholds="random"),
    "weights": dict(weights="random"),
}


def _variant_kwargs(name, shape, seed=3):
    kw = dict(VARIANTS[name])
    g = torch.Generator().manual_seed(seed)
    if kw.get("class_thresholds") == "random":
        kw["class_thresholds"] = torch.rand(shape[-1], generator=g) * 0.8
    if kw.get("weights") == "random":
        w = torch.rand(shape[:-1], generator=g)
        kw["weights"] = torch.where(w < 0.3, 0.0, w)  # some rows left out by a zero weight
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_matches_reference(backend, dtype, shape, soft, variant):
    if backend == "triton" and (shape == SHAPES["wide"]) and variant != "threshold":
        pytest.skip("the wide shape runs once per backend in the interpreter (slow)")
    if dtype == torch.float16 and variant in ("class_thresholds", "weights"):
        pytest.skip("float16 and bfloat16 share the kernels' code path; bfloat16 covers these")
    strong, weak = _views(shape, dtype)
    _assert_loss_matches(strong, weak, backend, soft=soft, **_variant_kwargs(variant, shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_grad_output(backend, reduction):
    strong, weak = _views((3, 4, 13), torch.float32)
    grad_output = _randn((3, 4) if reduction == "none" else (), torch.float32, seed=7)  # != 1
    out = _assert_loss_matches(strong, weak, backend, grad_output, threshold=0.4, reduction=reduction)
    assert out.loss.shape == ((3, 4) if reduction == "none" else ())
    assert out.labels.shape == out.confidence.shape == out.mask.shape == (3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(6, 37), (2, 3, 11), (3, 4099)], ids=["rows", "lead", "wide"])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.5}, {"class_thresholds": "random"}],
                         ids=["default", "temperature", "class_thresholds"])
def test_select_matches_reference(backend, dtype, shape, kw):
    kw = dict(kw)
    logits = _randn(shape, dtype, 3.0)
    if kw.get("class_thresholds") == "random":
        kw["class_thresholds"] = torch.rand(shape[-1], generator=torch.Generator().manual_seed(1)) * 0.6
    else:
        # Halfway between two rows' confidences: some rows pass, none sits near the boundary.
        conf = reference.select_pseudo_labels(logits.double(), temperature=kw.get("temperature", 1.0))[1]
        ordered = conf.flatten().sort().values
        kw["threshold"] = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    out = select_pseudo_labels(logits, backend=backend, **kw)
    labels, conf, mask = reference.select_pseudo_labels(logits.double(), **kw)
    assert torch.equal(out.labels, labels) and torch.equal(out.mask, mask)
    assert out.labels.dtype == torch.int64 and out.mask.dtype == torch.bool
    assert out.confidence.dtype == torch.promote_types(dtype, torch.float32)
    assert (out.confidence.double() - conf).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_equal_to_threshold_is_selected(backend):
    # Equal logits give confidence exactly 1/C (1/2, 1/4), so the comparison is exact;
    # 0.5 + 2**-24 is the next float32 above 0.5.
    weak = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    strong = _randn((2, 2), torch.float32)
    assert fused_pseudo_label_loss(strong, weak, threshold=0.5, backend=backend).mask.all()
    assert not fused_pseudo_label_loss(strong, weak, threshold=0.5 + 2**-24, backend=backend).mask.any()
    quarter = torch.zeros(3, 4)
    ct = torch.tensor([0.25, 0.9, 0.9, 0.9])  # the label of an all-equal row is 0
    assert select_pseudo_labels(quarter, class_thresholds=ct, backend=backend).mask.all()
    assert select_pseudo_labels(quarter, threshold=0.25, backend=backend).mask.all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("how", ["threshold", "zero_weights"])
def test_no_row_selected_gives_zero_loss_and_grad(backend, soft, how):
    strong, weak = _views((5, 7), torch.float32)
    strong[0] = float("-inf")  # left-out rows may hold anything, even an undefined softmax
    kw = dict(threshold=1.0) if how == "threshold" else dict(threshold=0.0, weights=torch.zeros(5))
    out, grad = _loss_and_grad(strong, weak, soft=soft, backend=backend, **kw)
    assert out.loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert not out.mask.any() if how == "threshold" else out.mask[1:].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_selected_is_cross_entropy(backend):
    strong, weak = _views((8, 10), torch.float32)
    out, grad = _loss_and_grad(strong, weak, threshold=0.0, backend=backend)
    s = strong.clone().requires_grad_()
    expected = F.cross_entropy(s, weak.argmax(-1))
    expected.backward()
    assert out.mask.all() and out.class_counts.sum() == 8
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, s.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_resolve_to_lowest_index(backend):
    weak = torch.full((3, 5000), -2.0)
    weak[0, [2, 5]] = 4.0  # two maxima close together
    weak[1, [100, 4500]] = 4.0  # in different SIMD chunks / Triton blocks
    weak[2] = 1.0  # all equal
    expected = torch.tensor([2, 100, 0])
    assert torch.equal(select_pseudo_labels(weak, backend=backend).labels, expected)
    assert torch.equal(select_pseudo_labels(weak, backend=backend).labels, weak.argmax(-1))
    out = fused_pseudo_label_loss(_randn((3, 5000), torch.float32), weak, threshold=0.0, backend=backend)
    assert torch.equal(out.labels, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_one_class(backend, soft):
    # C = 1: confidence 1, label 0, cross-entropy 0 and gradient 0.
    strong, weak = _views((4, 1), torch.float32)
    out, grad = _loss_and_grad(strong, weak, threshold=1.0, soft=soft, backend=backend)
    assert out.mask.all() and torch.equal(out.labels, torch.zeros(4, dtype=torch.int64))
    assert torch.equal(out.confidence, torch.ones(4))
    assert out.loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_masked_classes(backend, soft):
    # -inf logits rule classes out: finite loss where both views allow the target.
    strong, weak = _views((4, 9), torch.float32)
    strong[:, 0] = float("-inf")
    weak[:, 0] = float("-inf")
    weak[:, 1] = float("-inf")
    out = _assert_loss_matches(strong, weak, backend, threshold=0.2, soft=soft)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views(backend):
    base = _randn((9, 40), torch.float32)
    strong = base[::2, ::2]  # stride along C is 2: copied
    weak = _randn((20, 5), torch.float32, 3.0).t()  # transposed [5, 20]
    _assert_loss_matches(strong, weak, backend, threshold=0.3, soft=True)
    row_strided = _randn((10, 12), torch.float32, 3.0)[::2]  # rows strided, C contiguous: no copy
    _assert_loss_matches(row_strided, row_strided.flip(0), backend, threshold=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_gradient_matches_finite_differences(backend, soft):
    # torch.autograd.gradcheck runs the backward twice on one graph, which the in-place
    # backward refuses by design (see ops/_grad.py); this is its float64 central difference.
    strong, weak = _views((3, 5), torch.float64)
    weights = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)

    def f(s):
        return fused_pseudo_label_loss(s, weak, soft=soft, weights=weights, backend=backend).loss

    _, grad = _loss_and_grad(strong, weak, soft=soft, weights=weights, backend=backend)
    eps = 1e-6
    numerical = torch.zeros_like(strong)
    for i in range(strong.numel()):
        step = torch.zeros_like(strong).view(-1)
        step[i] = eps
        step = step.view_as(strong)
        with torch.no_grad():
            numerical.view(-1)[i] = (f(strong + step) - f(strong - step)) / (2 * eps)
    torch.testing.assert_close(grad, numerical, atol=1e-7, rtol=1e-6)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0  # weight 0 -> no gradient


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    strong, weak = _views((4, 6), torch.float32)
    strong.requires_grad_()
    ct = torch.rand(6)
    weights = torch.rand(4)
    for soft, reduction in [(False, "mean"), (True, "none")]:
        torch.library.opcheck(op.loss_op, (strong, weak, ct, weights, 0.5, 1.0, soft, reduction, True, backend))
        torch.library.opcheck(op.loss_op, (strong, weak, None, None, 0.5, 2.0, soft, reduction, True, backend))
    torch.library.opcheck(op.select_op, (weak, ct, 0.5, 1.0, backend))
    torch.library.opcheck(op.select_op, (weak, None, 0.5, 0.5, backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    strong, weak = _views((6, 10), torch.float32)
    ct = torch.full((10,), 0.4)

    def step(s, w):
        out = fused_pseudo_label_loss(s, w, class_thresholds=ct, soft=True, backend=backend)
        sel = select_pseudo_labels(w, threshold=0.4, backend=backend)
        return out.loss * 2, out.class_counts, sel.mask

    s1 = strong.clone().requires_grad_()
    loss, counts, mask = torch.compile(step, fullgraph=True)(s1, weak)
    loss.backward()
    s2 = strong.clone().requires_grad_()
    loss2, counts2, mask2 = step(s2, weak)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert torch.equal(counts, counts2) and torch.equal(mask, mask2)


def test_class_counts_and_no_grad_to_weak():
    strong, weak = _views((50, 6), torch.float32)
    weak.requires_grad_()
    out = fused_pseudo_label_loss(strong.requires_grad_(), weak, threshold=0.6)
    assert torch.equal(out.class_counts, torch.bincount(out.labels[out.mask], minlength=6))
    out.loss.backward()
    assert weak.grad is None and not out.confidence.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_undefined_rows_raise(backend):
    strong, weak = _views((3, 4), torch.float32)
    bad_weak = weak.clone()
    bad_weak[1] = float("-inf")
    with pytest.raises(ValueError, match="weak_logits"):
        fused_pseudo_label_loss(strong, bad_weak, backend=backend)
    bad_strong = strong.clone()
    bad_strong[1] = float("nan")
    with pytest.raises(ValueError, match="strong_logits"):
        fused_pseudo_label_loss(bad_strong, weak, threshold=0.0, backend=backend)
    with pytest.raises(ValueError, match="logits"):
        select_pseudo_labels(bad_weak, backend=backend)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(threshold=-0.1), ValueError, "threshold"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(weak_logits=torch.zeros(4, 6)), ValueError, "weak_logits"),
        (dict(class_thresholds=torch.full((4,), 0.5)), ValueError, "class_thresholds"),
        (dict(class_thresholds=torch.full((5,), 1.5)), ValueError, "class_thresholds"),
        (dict(weights=torch.ones(5)), ValueError, "weights"),
        (dict(weights=torch.ones(4, 1)), ValueError, "weights"),
        (dict(weights=-torch.ones(4)), ValueError, "weights"),
        (dict(strong_logits=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "strong_logits"),
        (dict(weak_logits=torch.zeros(4, 5, dtype=torch.int32)), TypeError, "weak_logits"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    args = dict(strong_logits=torch.randn(4, 5), weak_logits=torch.randn(4, 5))
    args.update(kwargs)
    with pytest.raises(error, match=name):
        fused_pseudo_label_loss(**args)


def test_select_bad_arguments():
    with pytest.raises(TypeError, match="logits"):
        select_pseudo_labels(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="threshold"):
        select_pseudo_labels(torch.zeros(3, 4), threshold=2.0)
    with pytest.raises(ValueError, match="class_thresholds"):
        select_pseudo_labels(torch.zeros(3, 4), class_thresholds=torch.zeros(3))
