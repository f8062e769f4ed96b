"""select_pseudo_labels on every kernel (CPU C++, CUDA C++, Triton) and the reference,
against reference.py in float64.

Inputs are fresh random logits (seeded per test); conftest fills every new buffer with NaN
(or the largest integer), so an element a kernel forgets to write shows. Labels and masks
must equal the float64 oracle's, confidences be within 1e-5. Thresholds are placed halfway
between two rows' confidences, so that no row sits within rounding of its cut. Cases marked
`cuda` run on a GPU; without one, the Triton kernel runs in Triton's interpreter.
"""
import math

import pytest
import torch

from conftest import (DEVICE_BACKENDS, TEMPERATURES, TRITON_COLUMN_BLOCKS, interpreted, opcheck_kernel, require,
                      temperature_sweep_logits)
from lepton_fast import reference, select_pseudo_labels
from lepton_fast.ops.pseudo_labels import SELECT_SPEC as SPEC

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
BACKENDS = DEVICE_BACKENDS
TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape, seed, dtype=torch.float32, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def midway_threshold(logits, temperature=1.0):
    """Halfway between the two middle confidences of the float64 oracle: about half the rows
    pass, and none is within rounding of the threshold."""
    confidence = reference.select_pseudo_labels(logits.double(), temperature=temperature)[1].flatten().sort().values
    if confidence.numel() < 2:
        return 0.5
    mid = confidence.numel() // 2
    return float(confidence[mid - 1] + confidence[mid]) / 2


def assert_matches(backend, logits, **kw):
    out = select_pseudo_labels(logits, backend=backend, **kw)
    labels, confidence, mask = reference.select_pseudo_labels(logits.double(), **kw)
    assert out.labels.dtype == torch.int64 and out.mask.dtype == torch.bool
    assert out.confidence.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert out.labels.shape == out.confidence.shape == out.mask.shape == logits.shape[:-1]
    assert torch.equal(out.labels.cpu(), labels.cpu()) and torch.equal(out.mask.cpu(), mask.cpu())
    torch.testing.assert_close(out.confidence.double(), confidence, **TOL)
    return out


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_range(temperature, device, backend):
    """Every T of the documented range (1e-8 ... 1e4) agrees with the float64 oracle, and no
    confidence exceeds 1: scaling before subtracting the max gave 6.17 and 1974.9 at T = 1e-8
    (and masks flipped)."""
    require(SPEC, device, backend)
    logits = temperature_sweep_logits((6, 37), temperature, seed=21, device=device)
    out = assert_matches(backend, logits, threshold=0.5, temperature=temperature)
    assert bool((out.confidence <= 1).all()), out.confidence


def _shapes():
    yield pytest.param((6, 37), id="C=37: every row has a vector tail")
    yield pytest.param((2, 3, 11), id="[B,T,C] leading dims")
    yield pytest.param((1, 9), id="N=1")
    yield pytest.param((5, 1100), id="C=1100: more than one CPU chunk (64 vectors), ragged")
    yield pytest.param((3, 4099), id="C=4099: one column more than Triton's widest block")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", list(_shapes()))
@pytest.mark.parametrize("how", ["threshold", "temperature", "class_thresholds"])
def test_matches_reference(how, shape, dtype, device, backend):
    require(SPEC, device, backend)
    if interpreted(device, backend) and shape[-1] > 2000 and dtype != torch.float32:
        pytest.skip("wide rows are slow in Triton's interpreter: float32 covers them")
    logits = randn(*shape, seed=1, dtype=dtype, device=device)
    if how == "class_thresholds":
        g = torch.Generator().manual_seed(2)
        kw = dict(class_thresholds=(torch.rand(shape[-1], generator=g) * 0.6).to(device))
    else:
        temperature = 0.5 if how == "temperature" else 1.0
        kw = dict(threshold=midway_threshold(logits, temperature), temperature=temperature)
    out = assert_matches(backend, logits, **kw)
    if how != "class_thresholds" and logits.shape[:-1].numel() > 1:
        assert out.mask.any() and not out.mask.all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ties_resolve_to_the_lowest_index(device, backend):
    # As torch.argmax: within a vector, across CPU chunks and Triton blocks, and a row of
    # equal values.
    require(SPEC, device, backend)
    weak = torch.full((4, 5000), -2.0)
    weak[0, [2, 5]] = 4.0
    weak[1, [100, 4500]] = 4.0
    weak[2] = 1.0
    weak[3, [4999, 3000]] = 4.0  # the later chunk's lanes rose first in the walk: still 3000
    weak = weak.to(device)
    out = select_pseudo_labels(weak, 0.0, 0.3, backend=backend)  # T < 1 scales ties, never breaks them
    assert out.labels.tolist() == [2, 100, 0, 3000] == weak.argmax(-1).tolist()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_confidence_equal_to_threshold_is_selected(device, backend):
    # Equal logits give confidence exactly 1/C (1/4 here), so the comparison is exact.
    require(SPEC, device, backend)
    quarter = torch.zeros(3, 4, device=device)
    assert select_pseudo_labels(quarter, threshold=0.25, backend=backend).mask.all()
    assert not select_pseudo_labels(quarter, threshold=0.25 + 2**-24, backend=backend).mask.any()
    ct = torch.tensor([0.25, 0.9, 0.9, 0.9], device=device)  # the label of an all-equal row is 0
    assert select_pseudo_labels(quarter, class_thresholds=ct, backend=backend).mask.all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_one_class_and_empty_batch(device, backend):
    # C = 1: confidence exactly 1, label 0. N = 0: empty outputs, no error.
    require(SPEC, device, backend)
    out = select_pseudo_labels(randn(4, 1, seed=3, device=device), threshold=1.0, backend=backend)
    assert out.mask.all() and (out.labels == 0).all() and (out.confidence == 1).all()
    out = select_pseudo_labels(torch.zeros(0, 7, device=device), backend=backend)
    assert out.labels.shape == out.confidence.shape == out.mask.shape == (0,)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "sliced", "unaligned"])
def test_non_contiguous(view, device, backend):
    require(SPEC, device, backend)
    if view == "transposed":  # stride along C is not 1
        logits = randn(40, 6, seed=4, device=device).t()
    elif view == "sliced":  # row stride != C
        logits = randn(12, 60, seed=4, device=device)[::2, 5:45]
    else:  # rows start one element in: the GPU kernels' scalar path
        logits = randn(6, 41, seed=4, device=device)[:, 1:]
    assert_matches(backend, logits, threshold=midway_threshold(logits))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_neg_inf_masks(device, backend):
    # Masked classes (-inf), at column 0 so that a row starts at -inf, and in a whole block.
    require(SPEC, device, backend)
    logits = randn(5, 70, seed=5)
    logits[:, ::7] = -math.inf
    logits[0, 16:32] = -math.inf
    out = assert_matches(backend, logits.to(device), threshold=0.3)
    assert torch.isfinite(out.confidence).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad", [-math.inf, math.nan, math.inf])
def test_undefined_row_is_an_error(bad, backend):
    require(SPEC, "cpu", backend)
    logits = randn(3, 10, seed=6)
    if bad == -math.inf:
        logits[1] = bad
    else:
        logits[1, 4] = bad
    with pytest.raises(ValueError, match="logits"):
        select_pseudo_labels(logits, backend=backend)


def _op_args(device):
    logits = randn(5, 19, seed=7, device=device)
    ct = torch.rand(19, generator=torch.Generator().manual_seed(8)).to(device)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731  # hyper-parameters: 0-d CPU float64
    return [(logits, f64(0.5), f64(1.0), None), (logits, f64(0.2), f64(0.5), ct)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    """The schema, fake kernel, autograd registration and AOT dispatch of every kernel."""
    require(SPEC, device, backend)
    opcheck_kernel(SPEC, device, backend, _op_args(device))


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_changing_hyper_parameters_do_not_recompile(device):
    """A threshold schedule and a temperature that change every step: one graph after the
    first specialisation, right values, no graph break."""
    from torch._dynamo.utils import counters

    require(SPEC, device, device)
    torch._dynamo.reset()
    counters.clear()
    logits = randn(8, 30, seed=9, device=device)
    compiled = torch.compile(lambda x, tau, T: tuple(select_pseudo_labels(x * 1.0, tau, T)), fullgraph=True)
    for step in range(5):
        tau, T = 0.1 + 0.1 * step, 0.5 + 0.25 * step
        labels, confidence, mask = compiled(logits, tau, T)
        ref_labels, ref_confidence, ref_mask = reference.select_pseudo_labels(logits.double(), tau, T)
        assert torch.equal(labels, ref_labels) and torch.equal(mask, ref_mask)
        torch.testing.assert_close(confidence.double(), ref_confidence, **TOL)
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]
    with pytest.raises(Exception, match="temperature"):
        compiled(logits, 0.5, 0.0)


BAD_INPUTS = [
    ("int logits", dict(logits=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "logits"),
    ("not a tensor", dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
    ("threshold > 1", dict(threshold=2.0), ValueError, "threshold"),
    ("threshold nan", dict(threshold=math.nan), ValueError, "threshold"),
    ("temperature < 0", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature str", dict(temperature="1"), TypeError, "temperature"),
    ("class_thresholds shape", dict(class_thresholds=torch.zeros(3)), ValueError, "class_thresholds"),
    ("class_thresholds < 0", dict(class_thresholds=torch.full((4,), -0.5)), ValueError, "class_thresholds"),
    ("class_thresholds int", dict(class_thresholds=torch.zeros(4, dtype=torch.int64)), TypeError,
     "class_thresholds"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("what,change,error,name", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, change, error, name, backend):
    require(SPEC, "cpu", backend)
    kw = dict(logits=randn(3, 4, seed=10))
    kw.update(change)
    with pytest.raises(error, match=name):
        select_pseudo_labels(kw.pop("logits"), backend=backend, **kw)


@TRITON_COLUMN_BLOCKS
def test_triton_column_blocks(n, c, block):
    require(SPEC, "cpu", "triton")
    from lepton_fast.kernels.pseudo_labels import select_pseudo_labels as triton_select

    logits = randn(n, c, seed=11)
    logits[0, [c // 3, c - 1]] = 20.0  # a tie across blocks: the first wins
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    labels, confidence, mask = triton_select(logits, f64(0.6), f64(2.0), None, block=block)
    ref_labels, ref_confidence, ref_mask = reference.select_pseudo_labels(logits.double(), 0.6, 2.0)
    assert torch.equal(labels, ref_labels) and torch.equal(mask, ref_mask)
    torch.testing.assert_close(confidence.double(), ref_confidence, **TOL)
