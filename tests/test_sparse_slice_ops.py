"""The sparse_slice_* ops (sparse_kd_loss split at its two passes over a row, the per-rank
kernels of vocab_parallel_sparse_kd_loss) on every kernel, in one process.

Each op against its float64 oracle in reference.py on fresh random data (the kernels accumulate
in float32, or float64 for float64 logits: the oracle runs on the values as the kernel read
them), and the ops composed as the ranks compose them (lepton_fast.distributed: the slices'
statistics merged by SliceMerge, with a max and a sum in place of the all-reduces) against
reference.sparse_kd_loss on the whole rows. conftest fills every new buffer with NaN, so an
element a kernel forgets to write shows.
"""
from pathlib import Path

import pytest
import torch

from conftest import (CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, TRITON_COLUMN_BLOCKS, assert_device_assertion, interpreted,
                      opcheck_kernel, require)
from lepton_fast import _backend, _validate, reference
from lepton_fast.ops import _reference
from lepton_fast.ops import sparse_kd_loss as sparse_ops
from lepton_fast.ops._reference import hyper_keywords
from lepton_fast.ops.sparse_kd_loss import GR_ENTRIES, GR_MAX, GR_MAX_UNLISTED, SP_MAX, SP_MAX_UNLISTED
from test_vocab_parallel_sparse import DIVERGENCES, TRUNCATIONS, V, _NewSliceTensors, data

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
F64_TOL = dict(atol=1e-12, rtol=1e-10)
ACC_TOL = {torch.float64: F64_TOL, torch.float32: dict(atol=2e-5, rtol=2e-5)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPLITS = [pytest.param((19, 18), id="19/18"), pytest.param((20, 0, 17), id="20/0/17"),
          pytest.param((V,), id="whole")]


def _params(device_backends):
    return [pytest.param(p.values, marks=p.marks, id=p.id) for p in device_backends]


@pytest.fixture(params=_params(DEVICE_BACKENDS))
def device_backend(request):
    """(device, backend): each kernel, Triton's in its interpreter on CPU tensors (the ops have
    no CUDA C++ kernel: those cases skip). The inputs are made on the CPU (the oracle's) and
    copied to the device (:func:`on`)."""
    device, backend = request.param
    require(sparse_ops.SLICE_GRAD_SPEC, device, backend)
    return device, backend


@pytest.fixture
def device(device_backend):
    return device_backend[0]


@pytest.fixture
def backend(device_backend):
    return device_backend[1]


def on(device, *tensors):
    """The tensors copied to ``device`` (None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def test_triton_is_the_cuda_kernel(monkeypatch):
    """Triton runs the slice ops on CUDA tensors by default (no CUDA C++ kernel of them); where
    it does not, their Triton cases above skip, so this is the test that fails."""
    require(sparse_ops.SPEC, "cpu", "triton")  # triton installed (sparse_kd_loss's kernel runs)
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    for spec in (sparse_ops.SLICE_STATS_SPEC, sparse_ops.SLICE_GRAD_SPEC):
        assert _backend.default(spec, "cuda") == "triton", spec.name
    assert sparse_ops.slice_backend(torch.device("cuda")) == "triton"


def teacher(data_kw, kw):
    """(student [n, V], indices, logprobs, counted entries, options, truncation) of data(**data_kw)
    and the loss keywords kw, as vocab_parallel_sparse_kd_loss checks and reads them."""
    s, idx, logp, mask, labels = data(**data_kw)
    kw = dict(kw)
    truncation = kw.pop("truncation", "renormalize")
    indices, logprobs, mask = _validate.sparse_teacher(idx, logp, mask, "student_logits", s)
    o = _validate.kd_options("vocab_parallel_sparse_kd_loss", "student_logits", s, labels=labels, **kw)
    counted = reference.sparse_counted_entries(indices, reference.sparse_teacher_entries(indices, mask, o.labels,
                                                                                         o.ignore_index))
    return s, indices, logprobs, counted, o, truncation


def sliced(device, backend, data_kw, kw, sizes):
    """(the loss, the slices' gradients side by side) through the slice ops on ``backend`` on
    ``device``; the merge and the rows' coefficients on the CPU, as the test's oracle."""
    s, indices, logprobs, counted, o, truncation = teacher(data_kw, kw)
    merge = sparse_ops.SliceMerge(o.hyper, truncation)
    parts = []
    labels, = on(device, o.labels)
    for offset, size in zip([sum(sizes[:r]) for r in range(len(sizes))], sizes):
        column = reference.sparse_slice_columns(indices, counted, offset, size)
        x, column = on(device, s[:, offset:offset + size], column)
        stats = sparse_ops.slice_stats(backend, x, column, labels, o.hyper, truncation, o.ignore_index, offset,
                                       V).cpu()
        assert stats.shape == (s.shape[0], sparse_ops.SP_ENTRIES + indices.shape[1])
        parts.append((x, column, offset, stats))
    merged_max = torch.stack([merge.maxima(st) for *_, st in parts]).amax(0)
    sums = sum(merge.rescaled(st, merged_max) for *_, st in parts)
    stats = merge.merged(parts[0][3].clone(), merged_max, sums)
    divisor = reference.mean_divisor(o.labels, o.ignore_index, s.shape[0])
    rows, coefficients = reference.sparse_slice_rows(
        counted, logprobs, o.labels, stats, truncation=truncation, ignore_index=o.ignore_index, n_classes=V,
        coefficients=True, grad_divisor=reference.reduction_divisor(o.reduction, divisor, o.num_items),
        **hyper_keywords(reference.sparse_slice_rows, o.hyper))
    loss = reference.reduce_rows(rows, o.reduction, divisor, o.num_items)
    grads = [sparse_ops.slice_grad(backend, x, column, labels, coefficients.to(device), o.hyper, o.ignore_index,
                                   offset).cpu()
             for x, column, offset, _ in parts]
    return loss, torch.cat(grads, -1)


def cases():
    """Both truncations and the three divergences, with and without the CE term (label
    smoothing), temperatures small and large, masked entries (an all-masked row), ignored rows,
    duplicate indices, K = 1 and K = V."""
    for truncation in TRUNCATIONS:
        for divergence in DIVERGENCES:
            base = dict(divergence=divergence, truncation=truncation, beta=0.3)
            yield dict(seed=1), dict(base, temperature=2.0)
            yield dict(seed=2, masked=True, labelled=True), dict(base, temperature=0.7, alpha=0.3, label_smoothing=0.1)
            yield dict(seed=3, teacher="random", k=9, labelled=True), dict(base, alpha=1.0 if divergence == "jsd" else 0.0)
        yield dict(seed=4, k=1), dict(truncation=truncation, divergence="reverse_kl")
        yield dict(seed=5, k=V, labelled=True), dict(truncation=truncation, alpha=0.4, temperature=1.5)
        yield dict(seed=6, k=V, teacher="random", masked=True), dict(truncation=truncation, divergence="jsd")
        yield dict(seed=7, masked=True, labelled=True), dict(truncation=truncation, temperature=0.05, alpha=0.2)
        yield dict(seed=8, labelled="all"), dict(truncation=truncation, alpha=0.5)


CASES = [pytest.param(d, k, id=f"{i}") for i, (d, k) in enumerate(cases())]


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("data_kw,kw", CASES)
def test_slices_give_the_whole_loss_float64(device, backend, data_kw, kw, sizes):
    if interpreted(device, backend) and sizes != (20, 0, 17):
        pytest.skip("the interpreter runs one split (with an empty slice): a kernel runs for seconds there")
    loss, grad = sliced(device, backend, data_kw, kw, sizes)
    s, idx, logp, mask, labels = data(**data_kw)
    x = s.clone().requires_grad_()
    want = reference.sparse_kd_loss(x, idx, logp, mask, labels=labels, **kw)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), **F64_TOL)
    torch.testing.assert_close(grad, x.grad, **F64_TOL)


def op_inputs(seed, n=9, c=37, k=6, dtype=torch.float32, class_offset=5):
    """(student [n, c] of ``dtype``, column [n, k] from random global indices with masked
    entries, labels [n] with labels in other slices), the slice at class_offset of rows of
    c + 13 classes; with n >= 5, also -inf classes and a NaN row (ignored), duplicates, an
    all-masked row and ignored rows."""
    n_classes = c + 13
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    indices = torch.randint(0, n_classes, (n, k), generator=g)
    read = torch.rand(n, k, generator=g) > 0.2
    labels = torch.randint(0, n_classes, (n,), generator=g)
    if n >= 5:
        if c:
            s[2, ::5] = float("-inf")
            s[4] = float("nan")  # an ignored row may hold anything
        indices[1] = indices[1, 0]  # duplicates: one counts
        read[3] = False  # an all-masked row
        labels[[0, 4]] = -100
    read &= (labels != -100)[:, None]
    counted = reference.sparse_counted_entries(indices, read)
    column = reference.sparse_slice_columns(indices, counted, class_offset, c)
    return s.to(dtype), column, labels, g


OP_MODES = {
    "renormalize": dict(truncation="renormalize"),
    "tail": dict(truncation="tail", temperature=2.0),
    "tail-ce": dict(truncation="tail", alpha=0.3, label_smoothing=0.1, temperature=0.5),
    "tail-ce-T1": dict(truncation="tail", alpha=0.3),
    "ce": dict(truncation="renormalize", alpha=1.0, label_smoothing=0.2, temperature=3.0),
}


@pytest.mark.parametrize("c,k", [(37, 6), (70, 1), (0, 4), (12, 12)], ids=["37x6", "K1", "empty", "K=C"])
@pytest.mark.parametrize("mode", list(OP_MODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_op(device, backend, dtype, mode, c, k):
    kw = dict(OP_MODES[mode])
    truncation = kw.pop("truncation")
    s, column, labels, _ = op_inputs(11, c=c, k=k, dtype=dtype)
    hyper = _validate.kd_hyper(**kw)
    got = sparse_ops.slice_stats(backend, *on(device, s, column, labels), hyper, truncation, -100, 5, c + 13).cpu()
    want = reference.sparse_slice_stats(s.double(), column, labels, truncation=truncation, ignore_index=-100,
                                        class_offset=5, n_classes=c + 13, **hyper_keywords(reference.sparse_slice_stats, hyper))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, **ACC_TOL[got.dtype])


def coefficients_for(s, column, g, temperature, zero_every=4):
    """Fresh random coefficients of sparse_slice_grad, against the slice's maxima as the merged
    ones would be (at or above them), every ``zero_every``-th one 0 (a term that adds nothing)."""
    x = s.double()
    n, k = column.shape
    coef = torch.randn(n, GR_ENTRIES + k, generator=g, dtype=torch.float64)
    coef[torch.rand(coef.shape, generator=g) < 1 / zero_every] = 0.0
    finite = torch.where(x.isfinite(), x, float("-inf"))
    row_max = finite.amax(-1).clamp(min=-50) if x.shape[1] else torch.zeros(n, dtype=torch.float64)
    unlisted = reference.sparse_slice_stats(finite, column, None, temperature=temperature, alpha=0.0,
                                            label_smoothing=0.0, truncation="tail", ignore_index=-100,
                                            class_offset=0, n_classes=x.shape[1])[:, SP_MAX_UNLISTED]
    coef[:, GR_MAX] = row_max + 1.0  # at T = 0.05 the unlisted term keeps its own exp (csrc kFoldUnlisted)
    coef[:, GR_MAX_UNLISTED] = torch.where(unlisted.isfinite(), unlisted, 0.0)
    return coef


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.05], ids=["T1", "T2", "T0.05"])
@pytest.mark.parametrize("c,k", [(37, 6), (70, 1), (0, 4), (12, 12)], ids=["37x6", "K1", "empty", "K=C"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_op(device, backend, dtype, c, k, temperature):
    s, column, labels, g = op_inputs(12, c=c, k=k, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = coefficients_for(s, column, g, temperature).to(acc)
    hyper = _validate.kd_hyper(temperature=temperature)
    got = sparse_ops.slice_grad(backend, *on(device, s, column, labels, coef), hyper, -100, 5).cpu()
    want = reference.sparse_slice_grad(s.double(), column, labels, coef.double(), temperature=temperature,
                                       ignore_index=-100, class_offset=5)
    assert got.dtype == dtype and got.shape == s.shape
    tol = ACC_TOL.get(dtype, dict(atol=1e-2, rtol=1e-2))  # bfloat16, float16: the output's rounding
    torch.testing.assert_close(got.double(), want, **tol)


def test_grad_without_labels_and_a_strided_slice(device, backend):
    """No labels (the soft term alone), and the slice a view of wider rows."""
    wide, column, _, g = op_inputs(13, c=40, k=5, dtype=torch.float32)
    wide[4] = 0.0  # the NaN row is not ignored without labels
    s = wide[:, :37]  # row stride 40
    column = torch.where(column < 37, column, -1)
    coef = coefficients_for(s, column, g, 1.5).float()
    hyper = _validate.kd_hyper(temperature=1.5)
    wide_on, column_on, coef_on = on(device, wide, column, coef)
    got = sparse_ops.slice_grad(backend, wide_on[:, :37], column_on, None, coef_on, hyper, -100, 0).cpu()
    want = reference.sparse_slice_grad(s.double(), column, None, coef.double(), temperature=1.5, ignore_index=-100,
                                       class_offset=0)
    torch.testing.assert_close(got.double(), want, **ACC_TOL[torch.float32])


def test_ignored_rows_are_zero(device, backend):
    s, column, labels, g = op_inputs(14)
    hyper = _validate.kd_hyper(temperature=2.0, alpha=0.5)
    coef = coefficients_for(s, column, g, 2.0).float()
    stats = sparse_ops.slice_stats(backend, *on(device, s, column, labels), hyper, "tail", -100, 5, 50).cpu()
    grad = sparse_ops.slice_grad(backend, *on(device, s, column, labels, coef), hyper, -100, 5).cpu()
    ignored = labels == -100
    assert (stats[ignored][:, [SP_MAX, SP_MAX_UNLISTED]] == float("-inf")).all()
    assert (stats[ignored][:, SP_MAX_UNLISTED + 1:] == 0).all()
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("what,message", [
    ("column out of range", r"column must be in \[-1, 37\)"),
    ("column twice", r"lists a column twice"),
    ("slice does not fit", r"does not fit in n_classes=40"),
    ("label out of range", r"labels must be in \[0, 50\)"),
])
@pytest.mark.parametrize("device_backend", _params(CPU_DEVICE_BACKENDS), indirect=True)
def test_bad_input_raises(backend, what, message):
    # (On a GPU these are device assertions, as the dense slice ops' (test_kd_slice_ops).)
    s, column, labels, g = op_inputs(15)
    offset, n_classes = 5, 50
    coef = coefficients_for(s, column, g, 1.0).float()
    if what == "column out of range":
        column[2, 0] = 37
    elif what == "column twice":
        column[5, :2] = 3
    elif what == "slice does not fit":
        n_classes = 40
    else:
        labels[1] = 50
    hyper = _validate.kd_hyper(alpha=0.5)
    with pytest.raises(ValueError, match=message):
        sparse_ops.slice_stats(backend, s, column, labels, hyper, "tail", -100, offset, n_classes)
    if what.startswith("column"):
        with pytest.raises(ValueError, match=message):
            sparse_ops.slice_grad(backend, s, column, labels, coef, hyper, -100, offset)


@pytest.mark.cuda
def test_cuda_data_errors_are_device_assertions():
    """A column out of the slice ends a GPU process (conftest.assert_device_assertion), as a
    label out of range does for the dense slice ops."""
    require(sparse_ops.SLICE_GRAD_SPEC, "cuda", "triton")
    assert_device_assertion(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lepton_fast import _validate
        from lepton_fast.ops import sparse_kd_loss as sparse_ops
        from test_sparse_slice_ops import on, op_inputs
        s, column, labels = on("cuda", *op_inputs(15)[:3])
        hyper = _validate.kd_hyper(alpha=0.5)
        bad = column.clone()
        bad[2, 0] = 37
    """, 'sparse_ops.slice_stats("triton", s, column, labels, hyper, "tail", -100, 5, 50)',
        'sparse_ops.slice_stats("triton", s, bad, labels, hyper, "tail", -100, 5, 50)')


def test_opcheck(device, backend):
    """The schemas, fake kernels and AOT dispatch of the slice ops."""
    s, column, labels, g = op_inputs(16)
    s = torch.where(s.isnan(), 0.0, s)  # opcheck compares runs, and NaN is not equal to itself
    hyper = _validate.kd_hyper(temperature=2.0, alpha=0.3, label_smoothing=0.1)
    coef = coefficients_for(s, column, g, 2.0).float()
    s, column, labels, coef = on(device, s, column, labels, coef)
    opcheck_kernel(sparse_ops.SLICE_STATS_SPEC, device, backend,
                   [(s, column, labels, hyper, "tail", -100, 5, 50), (s, column, None, hyper, "renormalize", -100, 0, 37)])
    opcheck_kernel(sparse_ops.SLICE_GRAD_SPEC, device, backend,
                   [(s, column, labels, coef, hyper, -100, 5), (s, column, None, coef, hyper, -100, 0)])


def test_reference_kernels_run_on_blocks_of_rows(monkeypatch):
    """The reference kernels (those of CUDA tensors without triton) make no new tensor of more
    than a block of rows of the slice, but the gradient they return (9 rows in blocks of 2)."""
    s, column, labels, g = op_inputs(17)
    hyper = _validate.kd_hyper(temperature=2.0, alpha=0.3, label_smoothing=0.1)
    coef = coefficients_for(s, column, g, 2.0).float()
    monkeypatch.setattr(reference, "SPARSE_BLOCK_ELEMENTS", 2 * s.shape[1])
    with _NewSliceTensors(2, s.shape[1]) as recorder:
        stats = _reference.sparse_slice_stats(s, column, labels, hyper, "tail", -100, 5, 50)
        grad = _reference.sparse_slice_grad(s, column, labels, coef, hyper, -100, 5)
    assert [shape for _, shape in recorder.shapes] == [tuple(s.shape)], recorder.shapes
    monkeypatch.undo()
    torch.testing.assert_close(stats, _reference.sparse_slice_stats(s, column, labels, hyper, "tail", -100, 5, 50))
    torch.testing.assert_close(grad, _reference.sparse_slice_grad(s, column, labels, coef, hyper, -100, 5))


@TRITON_COLUMN_BLOCKS
@pytest.mark.parametrize("mode", ["tail-ce", "ce"])
def test_triton_column_blocks(mode, n, c, block):
    """The Triton kernels at the edges of their column blocks (called with a small block): the
    entries' columns in several blocks, a ragged last block, one column."""
    require(sparse_ops.SPEC, "cpu", "triton")
    from lepton_fast.kernels.sparse_kd_loss import sparse_slice_grad, sparse_slice_stats

    kw = dict(OP_MODES[mode])
    truncation = kw.pop("truncation")
    s, column, labels, g = op_inputs(18, n=n, c=c, k=8)
    hyper = _validate.kd_hyper(**kw)
    stats = sparse_slice_stats(s, column, labels, hyper, truncation, -100, 5, c + 13, block=block)
    want = reference.sparse_slice_stats(s.double(), column, labels, truncation=truncation, ignore_index=-100,
                                        class_offset=5, n_classes=c + 13,
                                        **hyper_keywords(reference.sparse_slice_stats, hyper))
    torch.testing.assert_close(stats.double(), want, **ACC_TOL[torch.float32])
    coef = coefficients_for(s, column, g, kw["temperature"]).float()
    grad = sparse_slice_grad(s, column, labels, coef, hyper, -100, 5, block=block)
    want = reference.sparse_slice_grad(s.double(), column, labels, coef.double(), temperature=kw["temperature"],
                                       ignore_index=-100, class_offset=5)
    torch.testing.assert_close(grad.double(), want, **ACC_TOL[torch.float32])
