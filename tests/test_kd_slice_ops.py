"""The kd_slice_* ops (fused_kd_loss split at a row's steps, csrc/kd_loss.h) on every kernel
against reference.py in float64, in one process.

The classes of fresh random logits are cut in slices (37 as 13/13/11, as three ranks hold
them; with an empty slice; whole); each slice's statistics are merged here as
lepton_fast.distributed merges them across ranks (SliceMerge, with a max and a sum in place of
the all-reduces), and each slice's loss must be fused_kd_loss's on the whole rows and its
gradient the slice of the whole gradient. conftest fills every new buffer with NaN, so an
element a kernel forgets to write shows.
"""
import math
from pathlib import Path

import pytest
import torch

from conftest import (CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, DISAGREEING_ROWS, TEMPERATURES, assert_device_assertion,
                      disagreeing_rows, interpreted, opcheck_kernel, require, temperature_sweep_logits)
from lepton_fast._validate import kd_hyper
from lepton_fast import fused_kd_loss, reference
from lepton_fast.ops import kd_loss as kd_ops

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
TOL = dict(atol=1e-5, rtol=1e-5)
F64_TOL = dict(atol=1e-12, rtol=1e-10)


def randn(*shape, seed, dtype=torch.float64, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def random_labels(n, n_classes, seed, device="cpu"):
    labels = torch.randint(0, n_classes, (n,), generator=torch.Generator().manual_seed(seed))
    labels[::3] = -100
    return labels.to(device)


def sliced(backend, student, teacher, sizes, temperature=1.0, *, grad_output=None, **kd):
    """(each slice's loss, the slices' gradients side by side) through the slice ops on ``backend``;
    ``kd``: fused_kd_loss's keywords."""
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    n_classes = student.shape[-1]
    parts = []
    for offset, size in zip(offsets, sizes):
        s = student[..., offset:offset + size].detach().clone().requires_grad_()
        a = kd_ops.checked("fused_kd_loss", s, teacher[..., offset:offset + size], slice_of_classes=True,
                           temperature=temperature, **kd)
        parts.append((s, a, offset))
    merge = kd_ops.SliceMerge(parts[0][1].hyper)
    stats = [kd_ops.slice_stats(backend, a, offset, n_classes) for _, a, offset in parts]
    for st in stats:
        assert st.shape == (parts[0][1].student.shape[0], kd_ops.N_STATS)
    merged_max = torch.stack([merge.maxima(st) for st in stats]).amax(0)
    merged = merge.merged(merged_max, sum(merge.rescaled(st, merged_max) for st in stats))
    jsd = None
    if merge.jsd:
        jsd = sum(kd_ops.slice_jsd_sums(backend, a, merged) for _, a, _ in parts)
    losses, grads = [], []
    for s, a, offset in parts:
        loss = kd_ops.slice_loss(backend, a, merged, jsd, offset, n_classes)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
        losses.append(loss.detach())
        grads.append(s.grad)
    return losses, torch.cat(grads, -1)


def oracle(student, teacher, temperature=1.0, grad_output=None, **kw):
    """reference.fused_kd_loss in float64 on the whole rows, its gradient by autograd."""
    s = student.detach().double().requires_grad_()
    loss = reference.fused_kd_loss(s, teacher.double(), temperature, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.double())
    return loss.detach(), s.grad


def assert_sliced_matches(backend, student, teacher, sizes, temperature=1.0, tol=F64_TOL, **kw):
    losses, grad = sliced(backend, student, teacher, sizes, temperature, **kw)
    grad_output = kw.pop("grad_output", None)
    want_loss, want_grad = oracle(student, teacher, temperature, grad_output, **kw)
    for loss in losses:
        assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(loss.double(), want_loss, **tol)
    assert grad.dtype == student.dtype
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    return losses[0], grad


BACKENDS = DEVICE_BACKENDS
SPLITS = [pytest.param((13, 13, 11), id="13/13/11"), pytest.param((20, 0, 17), id="20/0/17"),
          pytest.param((37,), id="whole")]
MODES = {
    "no_labels": dict(),
    "labels_ignored": dict(labels=True),
    "alpha_smoothing": dict(labels=True, alpha=0.4, label_smoothing=0.1),
    "alpha1": dict(labels=True, alpha=1.0, label_smoothing=0.2),
}


def _require(device, backend):
    if backend != "reference":
        require(kd_ops.SLICE_SPEC, device, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_slices_give_the_whole_loss_float64(divergence, temperature, mode, sizes, device, backend):
    _require(device, backend)
    if interpreted(device, backend) and (sizes != (13, 13, 11) or temperature != 2.5):
        pytest.skip("Triton's interpreter runs one split and temperature: each launch costs a second")
    n, c = 6, 37
    s, t = randn(n, c, seed=1, device=device), randn(n, c, seed=2, device=device)
    kw = dict(MODES[mode])
    if kw.pop("labels", False):
        kw["labels"] = random_labels(n, c, seed=3, device=device)
    assert_sliced_matches(backend, s, t, sizes, temperature, divergence=divergence, beta=0.3, **kw)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_range(temperature, divergence, device, backend):
    """Every T of the documented range (1e-8 ... 1e4): the slices' statistics hold the maxima of
    the raw logits and merge with exp((max_r - max) / T), so the whole rows' loss and gradient
    agree with the float64 oracle (within one ulp of the logits, as fused_kd_loss's do)."""
    _require(device, backend)
    s = temperature_sweep_logits((5, 37), temperature, seed=41, device=device)
    t = temperature_sweep_logits((5, 37), temperature, seed=42, device=device)
    tol = dict(rtol=1e-5, atol=1e-5 + torch.finfo(s.dtype).eps * s.abs().max().item())
    assert_sliced_matches(backend, s, t, (13, 13, 11), temperature, tol, divergence=divergence, beta=0.3,
                          labels=random_labels(5, 37, seed=43, device=device), alpha=0.3)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("row", list(DISAGREEING_ROWS))
def test_small_temperature_where_the_rows_disagree_and_their_maxima_are_on_other_ranks(row, divergence, device,
                                                                                     backend):
    """Float32 at T = 1e-6 and 1e-8 where the raw logits differ by far more than T, with the
    two maxima of the one-hot row in different slices: each slice's KL sum is against its own
    maxima and the merge re-centres it on both merged ones (SliceMerge.rescaled), so nothing of
    size |x_s - x_t| / T cancels."""
    _require(device, backend)
    s, t, temperature = disagreeing_rows(row, divergence, device=device)
    c = s.shape[-1]
    losses, grad = sliced(backend, s, t, (1, 0, c - 1), temperature, divergence=divergence, scale_by_t2=False)
    want_loss, want_grad = oracle(s, t, temperature, divergence=divergence, scale_by_t2=False)
    for loss in losses:
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5 / temperature)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_grad_output(reduction, device, backend):
    _require(device, backend)
    n, c = 5, 37
    s, t = randn(n, c, seed=4, device=device), randn(n, c, seed=5, device=device)
    labels = random_labels(n, c, seed=6, device=device)
    go = randn(n, seed=7, device=device) if reduction == "none" else torch.tensor(-1.7, dtype=torch.float64,
                                                                                  device=device)
    loss, _ = assert_sliced_matches(backend, s, t, (13, 13, 11), 2.0, divergence="reverse_kl", labels=labels,
                                    alpha=0.3, reduction=reduction, grad_output=go)
    assert loss.shape == ((n,) if reduction == "none" else ())
    if reduction != "none":
        assert_sliced_matches(backend, s, t, (13, 13, 11), 2.0, divergence="jsd", labels=labels, alpha=0.3,
                              reduction=reduction, num_items_in_batch=7)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_is_the_fused_kernel(dtype, device, backend):
    """float32 and bfloat16 slices: the loss within float32's tolerance of the oracle, the
    gradient as close to the fused kernel's as rounding to ``dtype`` allows."""
    _require(device, backend)
    n, c = 4, 300
    s, t = randn(n, c, seed=8, dtype=dtype, device=device), randn(n, c, seed=9, dtype=dtype, device=device)
    kw = dict(divergence="jsd", beta=0.4, labels=random_labels(n, c, seed=10, device=device), alpha=0.2,
              label_smoothing=0.1)
    losses, grad = sliced(backend, s, t, (128, 100, 72), 2.0, **kw)
    want_loss, want_grad = oracle(s, t, 2.0, **kw)
    torch.testing.assert_close(losses[0].double(), want_loss, **TOL)
    x = s.detach().clone().requires_grad_()
    fused_kd_loss(x, t, 2.0, backend=None if backend == "reference" else backend, **kw).backward()
    ulp = (2**-8 if dtype == torch.bfloat16 else 2**-24) * want_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), x.grad.double(), atol=2 * ulp, rtol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_classes_and_a_masked_slice(divergence, device, backend):
    """-inf logits (padded vocabulary) in every slice, a row whose whole first slice is -inf,
    and an ignored row that is entirely -inf: the masked classes get zero gradient."""
    _require(device, backend)
    n, c = 4, 37
    s, t = randn(n, c, seed=11), randn(n, c, seed=12)
    masked = torch.zeros(n, c, dtype=torch.bool)
    masked[:, ::5] = True
    masked[1, :13] = True
    s[masked], t[masked] = -math.inf, -math.inf
    s[3], t[3] = -math.inf, -math.inf
    labels = torch.tensor([4, 21, 36, -100])
    s, t, labels = s.to(device), t.to(device), labels.to(device)
    _, grad = assert_sliced_matches(backend, s, t, (13, 13, 11), 2.0, divergence=divergence, labels=labels,
                                    alpha=0.3, reduction="none")
    assert (grad[masked.to(device)] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_a_padded_vocabulary_masked_finite_on_one_side_and_neg_inf_on_the_other(divergence, device, backend):
    """Columns 24.. (part of the second slice, all of the third) are a padded vocabulary: -1e4
    on the side whose probability weights the KL sum (exp underflows to 0), -inf on the other.
    Each such class adds 0, not 0 * inf = NaN: the loss is that of the real columns."""
    _require(device, backend)
    s, t = randn(3, 37, seed=13), randn(3, 37, seed=14)
    finite, ruled_out = (t, s) if divergence == "forward_kl" else (s, t)
    finite[:, 24:], ruled_out[:, 24:] = -1e4, -math.inf
    losses, grad = sliced(backend, s.to(device), t.to(device), (13, 13, 11), 2.0, divergence=divergence,
                          reduction="none")
    want_loss, want_grad = oracle(s[:, :24], t[:, :24], 2.0, divergence=divergence, reduction="none")
    for loss in losses:
        torch.testing.assert_close(loss.double().cpu(), want_loss, **F64_TOL)
    torch.testing.assert_close(grad[:, :24].double().cpu(), want_grad, **F64_TOL)
    assert (grad[:, 24:] == 0).all()


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
def test_undefined_row_and_bad_labels_raise(device, backend):
    _require(device, backend)
    s, t = randn(3, 37, seed=13, device=device), randn(3, 37, seed=14, device=device)
    s[1] = -math.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        sliced(backend, s, t, (13, 13, 11), 2.0)
    s[1] = 0.0
    with pytest.raises(ValueError, match="labels"):
        sliced(backend, s, t, (13, 13, 11), labels=torch.tensor([0, 37, 2], device=device), alpha=0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_data_errors_are_device_assertions(backend):
    """Labels out of range end a GPU process (conftest.assert_device_assertion)."""
    require(kd_ops.SLICE_SPEC, "cuda", backend)
    assert_device_assertion(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_kd_slice_ops import randn, sliced
        s, t = randn(3, 37, seed=13, device="cuda"), randn(3, 37, seed=14, device="cuda")
    """, f'sliced("{backend}", s, t, (13, 13, 11), labels=torch.tensor([0, 36, 2], device="cuda"), alpha=0.5)',
        f'sliced("{backend}", s, t, (13, 13, 11), labels=torch.tensor([0, 37, 2], device="cuda"), alpha=0.5)')


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_slice_that_does_not_fit_raises(device, backend):
    require(kd_ops.SLICE_SPEC, device, backend)
    s, t = randn(3, 13, seed=15, device=device), randn(3, 13, seed=16, device=device)
    a = kd_ops.checked("fused_kd_loss", s, t)
    with pytest.raises(ValueError, match="class_offset=30"):
        kd_ops.slice_stats(backend, a, 30, 37)


def _slice_op_args(device):
    s, t = randn(4, 13, seed=17, dtype=torch.float32, device=device), randn(4, 13, seed=18, dtype=torch.float32,
                                                                           device=device)
    labels = torch.tensor([3, -100, 20, 14], device=device)
    kl = kd_hyper(temperature=2.0, alpha=0.3, label_smoothing=0.1, scale_by_t2=False)
    jsd_hyper = kd_hyper(divergence="jsd", beta=0.3)
    stats = [(s, t, labels, kl, -100, 13, 37), (s, t, None, jsd_hyper, -100, 0, 13)]
    merged = torch.ops.lepton_fast.kd_slice_stats(*stats[1])
    jsd = (s, t, labels, merged, jsd_hyper, -100)
    jsd_sums = torch.ops.lepton_fast.kd_slice_jsd_sums(*jsd)
    loss = [
        (s.clone().requires_grad_(), t, None, merged, jsd_sums, jsd_hyper, -100, "mean", None, 0, 13, True),
        (s, t, labels, torch.ops.lepton_fast.kd_slice_stats(*stats[0]), None, kl, -100, "none", None, 13, 37, False),
    ]
    return stats, [jsd], loss


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    """The schemas, fake kernels, autograd registration and AOT dispatch of the slice ops."""
    require(kd_ops.SLICE_SPEC, device, backend)
    stats, jsd, loss = _slice_op_args(device)
    for spec, cases in ((kd_ops.STATS_SPEC, stats), (kd_ops.JSD_SUMS_SPEC, jsd), (kd_ops.SLICE_SPEC, loss)):
        opcheck_kernel(spec, device, backend, cases)
