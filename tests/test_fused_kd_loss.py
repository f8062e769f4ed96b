"""fused_kd_loss on every kernel (CPU C++, CUDA C++, Triton) against reference.py in float64.

Inputs are fresh random logits (seeded per test, never zeros); conftest fills every new
buffer with NaN, so an element a kernel forgets to write shows. float32 results must be
within 1e-5 (abs and rel) of the float64 reference; bfloat16/float16 gradients within 2x the
error of the reference run in that same dtype (the loss is float32 in every case and gets
the float32 tolerance). Cases marked `cuda` run the CUDA C++ and the compiled Triton kernel
on a GPU; without one, the Triton kernel runs on CPU tensors in Triton's interpreter.
"""
import inspect
import math
import re
import textwrap

import pytest
import torch

from conftest import (CPU_DEVICE_BACKENDS, DEVICE_BACKENDS, DISAGREEING_ROWS, TEMPERATURES, TRITON_COLUMN_BLOCKS,
                      disagreeing_rows, interpreted, low_precision_tolerance, opcheck_kernel, require,
                      run_on_each_cpu_capability, temperature_sweep_logits)
from lepton_fast import KDLoss, _validate, fused_kd_loss, reference, sparse_kd_loss
from lepton_fast._validate import KD_DEFAULTS, KD_FIELDS, kd_hyper, kd_values
from lepton_fast.ops.kd_loss import SPEC

# The interpreter evaluates both sides of tl.where with numpy, which warns about the
# -inf - -inf of masked lanes on the side that is thrown away.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["mean", "batchmean", "sum", "none"]
TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape, seed, dtype=torch.float32, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def random_labels(shape, n_classes, seed, device="cpu", ignore_every=3):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, n_classes, shape, generator=g)
    labels.view(-1)[::ignore_every] = -100  # some rows ignored
    return labels.to(device)


def loss_and_grad(fn, student, teacher, grad_output=None, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), s.grad


def ours(backend, student, teacher, grad_output=None, **kw):
    return loss_and_grad(lambda s, t, **k: fused_kd_loss(s, t, backend=backend, **k), student, teacher, grad_output,
                         **kw)


def oracle(student, teacher, grad_output=None, **kw):
    """reference.py in float64 on the same (already rounded) input values."""
    go = None if grad_output is None else grad_output.double()
    return loss_and_grad(reference.fused_kd_loss, student.double(), teacher.double(), go, **kw)


def assert_matches(backend, student, teacher, grad_output=None, **kw):
    loss, grad = ours(backend, student, teacher, grad_output, **kw)
    ref_loss, ref_grad = oracle(student, teacher, grad_output, **kw)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    return loss, grad


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_range(temperature, divergence, device, backend):
    """Every T of the documented range (1e-8 ... 1e4) agrees with the float64 oracle, soft and
    hard terms together. A kernel that scales before it subtracts the max overflowed at
    T = 1e-8 ("holds +inf or NaN" on finite logits)."""
    require(SPEC, device, backend)
    n, c = 5, 37
    s = temperature_sweep_logits((n, c), temperature, seed=11, device=device)
    t = temperature_sweep_logits((n, c), temperature, seed=12, device=device)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, labels=random_labels((n,), c, seed=13,
                                                                                              device=device), alpha=0.3)
    loss, grad = ours(backend, s, t, **kw)
    ref_loss, ref_grad = oracle(s, t, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    # Beside 1e-5 of the largest gradient, one ulp of the logits (their own precision): at a
    # small T the reverse-KL gradient's row constant D is a difference of terms of size x / T.
    atol = 1e-5 * ref_grad.abs().max().item() + torch.finfo(s.dtype).eps * s.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("labels_mode", ["no_labels", "labels_ignore", "labels_alpha"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_mode_float32(divergence, reduction, temperature, labels_mode, device, backend):
    require(SPEC, device, backend)
    # C = 37: not a multiple of any vector width, so every row has a tail.
    n, c = 6, 37
    s, t = randn(n, c, seed=1, device=device), randn(n, c, seed=2, device=device)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, reduction=reduction)
    if labels_mode != "no_labels":
        kw["labels"] = random_labels((n,), c, seed=3, device=device)
    if labels_mode == "labels_alpha":
        kw.update(alpha=0.4, label_smoothing=0.1)
    assert_matches(backend, s, t, **kw)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_alpha_one_is_cross_entropy(label_smoothing, temperature, device, backend):
    require(SPEC, device, backend)
    s, t = randn(5, 29, seed=4, device=device), randn(5, 29, seed=5, device=device)
    labels = random_labels((5,), 29, seed=6, device=device)
    loss, _ = assert_matches(backend, s, t, temperature=temperature, labels=labels, alpha=1.0,
                             label_smoothing=label_smoothing)
    ce = torch.nn.functional.cross_entropy(s.double(), labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.double(), ce, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_ends_are_the_kls(beta, device, backend):
    require(SPEC, device, backend)
    s, t = randn(4, 33, seed=7, device=device), randn(4, 33, seed=8, device=device)
    jsd = fused_kd_loss(s, t, 2.0, divergence="jsd", beta=beta, backend=backend)
    kl = fused_kd_loss(s, t, 2.0, divergence="forward_kl" if beta == 0 else "reverse_kl", backend=backend)
    torch.testing.assert_close(jsd, kl, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_without_grad_is_the_same(divergence, device, backend):
    # No gradient wanted: the kernel skips its gradient pass (one pass for the KLs).
    require(SPEC, device, backend)
    s, t = randn(7, 300, seed=9, device=device), randn(7, 300, seed=10, device=device)
    with torch.no_grad():
        loss = fused_kd_loss(s, t, 2.0, divergence=divergence, reduction="none", backend=backend)
    ref = reference.fused_kd_loss(s.double(), t.double(), 2.0, divergence=divergence, reduction="none")
    torch.testing.assert_close(loss.double(), ref, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_other_dtypes(divergence, dtype, device, backend):
    require(SPEC, device, backend)
    n, c = 8, 300
    s, t = randn(n, c, seed=11, dtype=dtype, device=device), randn(n, c, seed=12, dtype=dtype, device=device)
    kw = dict(temperature=2.0, divergence=divergence, labels=random_labels((n,), c, seed=13, device=device),
              alpha=0.3, label_smoothing=0.1)
    if dtype == torch.float64:  # accumulated in float64: the float32 tolerance is loose
        assert_matches(backend, s, t, **kw)
        return
    loss, grad = ours(backend, s, t, **kw)
    ref_loss, ref_grad = oracle(s, t, **kw)
    low_loss, low_grad = loss_and_grad(reference.fused_kd_loss, s, t, **kw)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    err = (grad.double() - ref_grad).abs().max().item()
    ref_err = (low_grad.double() - ref_grad).abs().max().item()
    assert ref_err > 0  # the reference in low precision does round, so the bound is not vacuous
    assert err <= low_precision_tolerance(dtype, ref_err, backend, ref_grad.abs().max().item()), (err, ref_err)


def _shapes():
    yield pytest.param((1, 50), id="N=1")
    yield pytest.param((9, 1), id="C=1: every softmax is 1, loss 0")
    yield pytest.param((2, 3, 40), id="[B,T,C] leading dims")
    yield pytest.param((0, 17), id="N=0: an empty batch, loss 0")
    yield pytest.param((3, 50257), id="C=50257 GPT-2 vocabulary, odd: no vector path")
    yield pytest.param((2, 131072), id="C=131072: many column blocks per row")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", list(_shapes()))
def test_shapes(shape, divergence, device, backend):
    require(SPEC, device, backend)
    if interpreted(device, backend) and shape[-1] > 1000:
        pytest.skip("wide rows take minutes in Triton's interpreter; the compiled kernels cover them")
    s, t = randn(*shape, seed=14, device=device), randn(*shape, seed=15, device=device)
    labels = random_labels(shape[:-1], shape[-1], seed=16, device=device)
    for reduction in ("mean", "none"):
        loss, _ = assert_matches(backend, s, t, temperature=2.0, divergence=divergence, labels=labels,
                                 alpha=0.25, reduction=reduction)
        assert loss.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "sliced", "unaligned"])
def test_non_contiguous(view, device, backend):
    require(SPEC, device, backend)
    if view == "transposed":  # [C, N] storage seen as [N, C]: stride along C is not 1
        s, t = randn(40, 6, seed=17, device=device).t(), randn(40, 6, seed=18, device=device).t()
    elif view == "sliced":  # every other row and a window of classes: row stride != C
        s, t = randn(12, 60, seed=17, device=device)[::2, 5:45], randn(12, 60, seed=18, device=device)[::2, 5:45]
    else:  # rows start one element in: not 16-byte aligned, the GPU kernels' scalar path
        s, t = randn(6, 41, seed=17, device=device)[:, 1:], randn(6, 41, seed=18, device=device)[:, 1:]
    assert_matches(backend, s, t, temperature=2.0, divergence="jsd", labels=random_labels((6,), 40, seed=19,
                                                                                             device=device), alpha=0.5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_neg_inf_masks(divergence, device, backend):
    require(SPEC, device, backend)
    n, c = 5, 70
    s, t = randn(n, c, seed=20), randn(n, c, seed=21)
    both = torch.zeros(n, c, dtype=torch.bool)
    both[:, ::7] = True  # vocabulary padding masked in both; column 0 too, so a row starts at -inf
    both[0, 16:32] = True  # a whole block of columns masked
    s[both], t[both] = -math.inf, -math.inf
    if divergence in ("forward_kl", "jsd"):
        t[:, 3::11] = -math.inf  # the teacher rules classes out: they add nothing
    if divergence in ("reverse_kl", "jsd"):
        s[:, 5::13] = -math.inf  # the student rules classes out
    s, t = s.to(device), t.to(device)
    loss, grad = assert_matches(backend, s, t, temperature=2.0, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[both.to(device)] == 0).all()


def padded_vocabulary(divergence, fill, device):
    """Logits whose last 20 columns (a padded vocabulary) one model masks with -inf and the
    other with a finite ``fill`` so low that its probability is 0 in float32 (HF masks with
    torch.finfo(dtype).min): (student, teacher, the 50 real columns)."""
    s, t = randn(4, 70, seed=60), randn(4, 70, seed=61)
    finite, ruled_out = (t, s) if divergence == "forward_kl" else (s, t)  # p's side holds the finite fill
    finite[:, 50:], ruled_out[:, 50:] = fill, -math.inf
    return s.to(device), t.to(device), slice(0, 50)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("fill", [-1e4, torch.finfo(torch.float32).min], ids=["-1e4", "finfo.min"])
def test_a_class_of_probability_zero_adds_nothing_whatever_the_other_side(fill, divergence, device, backend):
    # 0 log 0 = 0 holds for a class whose probability is 0 in the accumulation dtype, not only
    # for a -inf logit: the other model's -inf there makes the term 0 * inf, which was NaN
    # (an error naming a non-finite input) on the Triton and reference kernels while the CPU
    # kernel gave the loss. The loss is that of the real columns alone.
    require(SPEC, device, backend)
    s, t, real = padded_vocabulary(divergence, fill, device)
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, reduction="none")
    loss, grad = ours(backend, s, t, **kw)
    ref_loss, ref_grad = oracle(s[:, real], t[:, real], **kw)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(grad[:, real].double(), ref_grad, **TOL)
    assert (grad[:, 50:] == 0).all()


@pytest.mark.parametrize("block", [16, 64])  # the padded classes in blocks of their own, before the rescale
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_triton_a_class_of_probability_zero_adds_nothing_across_blocks(divergence, block):
    require(SPEC, "cpu", "triton")
    from lepton_fast.kernels.kd_loss import fused_kd_loss as triton_kd_loss

    s, t, real = padded_vocabulary(divergence, -1e4, "cpu")
    s, t = s.flip(-1).contiguous(), t.flip(-1).contiguous()  # the padded block first: its sum is rescaled by 0
    loss, _ = triton_kd_loss(s, t, None, kd_hyper(divergence=divergence), -100, "none", None, False, block=block)
    ref_loss, _ = oracle(s[:, 20:], t[:, 20:], divergence=divergence, reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_func_grad_is_refused_naming_the_op_and_the_way_out(device, backend):
    # torch's own message (the C++ autograd kernel's, or without the extension the Python one's)
    # named neither the op nor what to do; vmap alone works, with either.
    require(SPEC, device, backend)
    s, t = randn(3, 4, 9, seed=62, device=device), randn(3, 4, 9, seed=63, device=device)
    with pytest.raises(RuntimeError, match=r"^fused_kd_loss: torch\.func's grad.*lepton_fast\.reference\.fused_kd_loss"):
        torch.func.grad(lambda x: fused_kd_loss(x, t[0], temperature=2.0, backend=backend))(s[0])
    ref = [reference.fused_kd_loss(s[i].double(), t[i].double(), temperature=2.0) for i in range(3)]
    vmapped = torch.vmap(lambda x, y: fused_kd_loss(x, y, temperature=2.0, backend=backend))(s, t)
    torch.testing.assert_close(vmapped.double(), torch.stack(ref), **TOL)
    expected = torch.func.grad(lambda x: reference.fused_kd_loss(x, t[0].double(), temperature=2.0))(s[0].double())
    torch.testing.assert_close(ours(backend, s[0], t[0], temperature=2.0)[1].double(), expected, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_infinite_loss_is_the_true_value(device, backend):
    # The student rules out a class the teacher allows: KL(p_t || p_s) is +inf, not NaN.
    require(SPEC, device, backend)
    s, t = randn(3, 20, seed=22), randn(3, 20, seed=23, device=device)
    s[1, 4] = -math.inf
    loss = fused_kd_loss(s.to(device), t, reduction="none", backend=backend)
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(reduction, device, backend):
    require(SPEC, device, backend)
    s, t = randn(4, 30, seed=24), randn(4, 30, seed=25, device=device)
    s[2] = -math.inf  # an ignored row may hold anything
    labels = torch.full((4,), -100, device=device)
    loss, grad = ours(backend, s.to(device), t, labels=labels, alpha=0.5, reduction=reduction)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_output_not_one(device, backend):
    # The backward's scale_grad_: a 0-d grad_output != 1 and a per-row one ("none").
    require(SPEC, device, backend)
    s, t = randn(6, 45, seed=26, device=device), randn(6, 45, seed=27, device=device)
    labels = random_labels((6,), 45, seed=28, device=device)
    assert_matches(backend, s, t, torch.tensor(3.7, device=device), temperature=2.0, labels=labels, alpha=0.3)
    assert_matches(backend, s, t, torch.tensor(-0.25, device=device), divergence="reverse_kl", reduction="sum")
    assert_matches(backend, s, t, randn(6, seed=29, device=device), divergence="jsd", reduction="none",
                   labels=labels)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_num_items_in_batch_divides_the_sum(reduction, device, backend):
    # transformers/TRL gradient accumulation: the summed loss over a count given from outside.
    require(SPEC, device, backend)
    s, t = randn(6, 23, seed=60, device=device), randn(6, 23, seed=61, device=device)
    labels = random_labels((6,), 23, seed=62, device=device)
    for count in (7, torch.tensor(7.0)):
        loss, grad = assert_matches(backend, s, t, temperature=2.0, labels=labels, alpha=0.5, reduction=reduction,
                                    num_items_in_batch=count)
        total, total_grad = ours(backend, s, t, temperature=2.0, labels=labels, alpha=0.5, reduction="sum")
        torch.testing.assert_close(loss, total / 7, **TOL)
        torch.testing.assert_close(grad, total_grad / 7, **TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_teacher_of_another_dtype_is_read_as_given(device, backend):
    # A float32 teacher is never rounded to a bfloat16 student's precision (that cost 0.8 %
    # of the loss here), and a finite float32 value beyond float16's range never overflows.
    require(SPEC, device, backend)
    s = randn(8, 64, seed=63, dtype=torch.bfloat16, device=device)
    t = s.float() + randn(8, 64, seed=64, device=device, scale=0.1) + 20
    loss, grad = ours(backend, s, t, temperature=1.0)
    ref_loss, ref_grad = oracle(s, t, temperature=1.0)
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref_grad, atol=2**-8 * ref_grad.abs().max().item(), rtol=0)
    big = randn(4, 16, seed=65, device=device) * 5000  # up to ~70000
    half = randn(4, 16, seed=66, dtype=torch.float16, device=device)
    loss, _ = ours(backend, half, big, temperature=10000.0)
    ref_loss, _ = oracle(half, big, temperature=10000.0)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)


def test_gradient_buffer_is_recycled_only_when_free():
    # The CPU C++ kernel: a freed gradient's memory serves the next call (no page faults); one
    # that is still held is never handed out again.
    require(SPEC, "cpu", "cpu")
    s, t = randn(64, 8192, seed=67), randn(64, 8192, seed=68)  # 2 MiB: above the recycling size
    x = s.clone().requires_grad_()
    fused_kd_loss(x, t).backward()
    first = x.grad.data_ptr()
    x.grad = None
    fused_kd_loss(x, t).backward()
    assert x.grad.data_ptr() == first
    held = x.grad
    x.grad = None
    fused_kd_loss(x, t).backward()
    assert x.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, x.grad, rtol=0, atol=0)


# The CPU kernel writes a gradient of 32 MiB or more around the caches (non-temporal stores,
# which need a vector-aligned address): each path once, with labels for the CE term.
@pytest.mark.parametrize("shape,dtype", [
    pytest.param((256, 32768), torch.float32, id="fp32 every row aligned: all streamed"),
    pytest.param((257, 32771), torch.float32, id="fp32 odd C: one row in 16 streamed, the others stored"),
    pytest.param((128, 32768), torch.float64, id="fp64 streamed"),
])
def test_gradient_past_the_streaming_size(shape, dtype):
    require(SPEC, "cpu", "cpu")
    assert shape[0] * shape[1] * dtype.itemsize >= 32 << 20
    s, t = randn(*shape, seed=81, dtype=dtype), randn(*shape, seed=82, dtype=dtype)
    labels = random_labels(shape[:1], shape[1], seed=83)
    assert_matches("cpu", s, t, temperature=2.0, labels=labels, alpha=0.3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(divergence, device, backend):
    require(SPEC, device, backend)
    if backend == "triton":
        pytest.skip("gradcheck backpropagates repeatedly through one graph: compiled with the default kernel only")
    s = randn(3, 7, seed=30, dtype=torch.float64, scale=1.0, device=device).requires_grad_()
    t = randn(3, 7, seed=31, dtype=torch.float64, scale=1.0, device=device)
    labels = torch.tensor([2, -100, 6], device=device)
    # Each case compiles the same lambda anew; without a reset the later cases hit dynamo's
    # recompile limit, which fullgraph=True turns into an error.
    torch.compiler.reset()
    for reduction in ("mean", "none"):
        # gradcheck runs several backwards through one graph, which the eager op refuses (its
        # backward scales the saved gradient in place, see test_second_backward_raises);
        # traced by AOTAutograd the backward is functional, and the forward still the kernel.
        fn = torch.compile(
            lambda x: fused_kd_loss(x, t, 1.5, divergence=divergence, labels=labels, alpha=0.3,
                                    label_smoothing=0.1, reduction=reduction),
            backend="aot_eager", fullgraph=True,
        )
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6)


def _op_args(device, requires_grad):
    s = randn(4, 19, seed=32, device=device).requires_grad_(requires_grad)
    t = randn(4, 19, seed=33, device=device)
    labels = random_labels((4,), 19, seed=34, device=device)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return [
        (s, t, labels, kd_hyper(temperature=2.0, alpha=0.3, label_smoothing=0.1), -100, "mean", None, requires_grad),
        (s, t, None, kd_hyper(divergence="jsd", beta=0.3, scale_by_t2=False), -100, "none", None, requires_grad),
        (s, t, labels, kd_hyper(temperature=0.5, divergence="reverse_kl", alpha=0.5), -100, "sum", f64(5.0),
         requires_grad),
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
    s, t = randn(2, 3, 41, seed=35, device=device), randn(2, 3, 41, seed=36, device=device)
    labels = random_labels((2, 3), 41, seed=37, device=device)

    def step(x):
        return fused_kd_loss(x, t, 2.0, divergence="jsd", labels=labels, alpha=0.2) * 2

    compiled = torch.compile(step, fullgraph=True)
    eager_loss, eager_grad = loss_and_grad(lambda x, _t: step(x), s, t)
    loss, grad = loss_and_grad(lambda x, _t: compiled(x), s, t)
    torch.testing.assert_close(loss, eager_loss, **TOL)
    torch.testing.assert_close(grad, eager_grad, **TOL)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("kind,compiles", [("tensor", 1), ("float", 2)])
def test_changing_hyper_parameters_do_not_recompile(device, kind, compiles):
    """Schedules change T, alpha, beta and label smoothing every step: 0-d CPU tensors never
    recompile; Python floats recompile once, when torch.compile's automatic dynamic marks
    them dynamic after the first specialisation (README, "Hyper-parameters"). Right values,
    no graph break."""
    from torch._dynamo.testing import CompileCounter

    require(SPEC, device, device)
    torch._dynamo.reset()
    counter = CompileCounter()
    s, t = randn(4, 30, seed=38, device=device), randn(4, 30, seed=39, device=device)
    labels = random_labels((4,), 30, seed=40, device=device)
    compiled = torch.compile(
        lambda x, T, a, b, ls: fused_kd_loss(x, t, T, divergence="jsd", beta=b, labels=labels, alpha=a,
                                             label_smoothing=ls),
        fullgraph=True, backend=counter,
    )
    given = (lambda v: torch.tensor(v, dtype=torch.float64)) if kind == "tensor" else float
    for step in range(5):
        T, a, b, ls = 1.0 + step, 0.1 * step, 0.2 + 0.1 * step, 0.05 * step
        got = compiled(s, *map(given, (T, a, b, ls)))
        want = reference.fused_kd_loss(s.double(), t.double(), T, divergence="jsd", beta=b, labels=labels, alpha=a,
                                       label_smoothing=ls)
        torch.testing.assert_close(got.double(), want, **TOL)
    assert counter.frame_count == compiles
    with pytest.raises(Exception, match="temperature"):
        compiled(s, *map(given, (-1.0, 0.1, 0.2, 0.0)))


BAD_INPUTS = [
    ("teacher shape", dict(teacher=randn(4, 11, seed=0)), ValueError, "teacher_logits"),
    ("labels shape", dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
    ("labels range", dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
    ("labels negative", dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels"),
    ("labels float", dict(labels=torch.zeros(4)), TypeError, "labels"),
    ("ignore_index float", dict(ignore_index=5.0), TypeError, r"^ignore_index must be an int, got float 5\.0$"),
    ("int logits", dict(student=torch.ones(4, 10, dtype=torch.long)), TypeError, "student_logits"),
    ("int teacher", dict(teacher=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_logits"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature inf", dict(temperature=math.inf), ValueError, "temperature"),
    ("temperature nan", dict(temperature=math.nan), ValueError, "temperature"),
    ("temperature str", dict(temperature="2"), TypeError, "temperature"),
    ("temperature [2]", dict(temperature=torch.ones(2)), ValueError, "temperature"),
    ("beta < 0", dict(divergence="jsd", beta=-0.1), ValueError, "beta"),
    ("beta > 1", dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    ("divergence", dict(divergence="kl"), ValueError, "divergence"),
    ("scale_by_t2 int", dict(scale_by_t2=1), TypeError, "scale_by_t2 must be a bool"),
    ("unknown keyword", dict(alpah=0.5), TypeError, r"fused_kd_loss\(\) got an unexpected keyword argument 'alpah'"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("alpha without labels", dict(alpha=0.5), ValueError, "labels"),
    ("alpha > 1", dict(alpha=1.5, labels=torch.tensor([0, 1, 2, 3])), ValueError, "alpha"),
    ("num_items 0", dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("num_items with none", dict(num_items_in_batch=3, reduction="none"), ValueError, "num_items_in_batch"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("what,change,error,name", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, change, error, name, backend):
    if backend != "reference":
        require(SPEC, "cpu", backend)
    kw = dict(student=randn(4, 10, seed=38), teacher=randn(4, 10, seed=39))
    kw.update(change)
    with pytest.raises(error, match=name):
        fused_kd_loss(kw.pop("student"), kw.pop("teacher"), backend=backend, **kw)


def test_hyper_parameters_travel_packed():
    """The KD schemas take the hyper-parameters as one float64 CPU tensor (_validate.KD_FIELDS),
    packed once per distinct set of values, which every kernel reads back as they were given."""
    given = dict(temperature=2.5, divergence="reverse_kl", beta=0.25, alpha=0.75, label_smoothing=0.125,
                 scale_by_t2=False)
    hyper = kd_hyper(**given)
    assert hyper.dtype == torch.float64 and hyper.device.type == "cpu" and hyper.shape == (len(KD_FIELDS),)
    assert kd_values(hyper) == given
    assert kd_hyper(**given) is hyper  # remembered: a training loop's same values cost a lookup
    assert kd_hyper(**{**given, "beta": 0.5}) is not hyper
    with pytest.raises(TypeError, match="temprature"):
        kd_hyper(temprature=2.0)


@pytest.mark.parametrize("name", ["fused_kd_loss", "sparse_kd_loss", "fused_linear_kd_loss",
                                  "fused_linear_sparse_kd_loss", "distributed.vocab_parallel_kd_loss",
                                  "distributed.vocab_parallel_sparse_kd_loss"])
def test_kd_functions_share_one_keyword_list(name):
    """Every public KD function takes the keywords of _validate.KDKeywords from that one list:
    each in its signature (help(), inspect.signature) with the default of KD_DEFAULTS and in
    its docstring; temperature stays positional; the checks at construction see them all."""
    import importlib

    module, _, attr = ("lepton_fast." + name).rpartition(".")
    fn = getattr(importlib.import_module(module), attr)
    params = inspect.signature(fn).parameters
    assert params["temperature"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for keyword, default in KD_DEFAULTS.items():
        assert params[keyword].default == default, keyword
        assert keyword == "temperature" or params[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert f"        {keyword}: " in fn.__doc__ or keyword == "temperature", keyword
    assert "KD_KEYWORDS" not in fn.__doc__
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):  # (KDLoss, TRL)
        _validate.kd_hyper_parameters(fn, temprature=2.0)


def test_unknown_keyword_names_the_function():
    with pytest.raises(TypeError, match=r"sparse_kd_loss\(\) got an unexpected keyword argument 'truncate'"):
        sparse_kd_loss(randn(2, 5, seed=1), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), truncate="tail")


@pytest.mark.parametrize("hyper, match", [
    (torch.tensor(2.0, dtype=torch.float64), "hyper must have shape"),
    (torch.zeros(len(KD_FIELDS), dtype=torch.float32), "hyper must be Double"),
    (torch.tensor([1.0, 3.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64), "divergence code"),
])
def test_compiled_kernel_refuses_a_malformed_hyper(hyper, match):
    """make_kd_params (csrc/kd_loss.h), the one reader of the packed tensor, checks it once."""
    require(SPEC, "cpu", "cpu")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lepton_fast.fused_kd_loss(randn(2, 5, seed=1), randn(2, 5, seed=2), None, hyper, -100, "mean",
                                            None, False)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_all_neg_inf_row_is_an_error(which, backend):
    if backend != "reference":
        require(SPEC, "cpu", backend)
    s, t = randn(3, 10, seed=40), randn(3, 10, seed=41)
    (s if which == "student" else t)[1] = -math.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        fused_kd_loss(s, t, backend=backend)


def test_backend_forcing(monkeypatch):
    require(SPEC, "cpu", "cpu")
    s, t = randn(3, 10, seed=42), randn(3, 10, seed=43)
    calls = []
    real = reference.fused_kd_loss
    monkeypatch.setattr(reference, "fused_kd_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("LEPTON_FAST_BACKEND", "reference")
    loss = fused_kd_loss(s, t)
    assert calls == [1]
    torch.testing.assert_close(fused_kd_loss(s, t, backend="cpu"), loss, **TOL)  # the keyword wins
    assert calls == [1]
    monkeypatch.setenv("LEPTON_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LEPTON_FAST_BACKEND"):
        fused_kd_loss(s, t)
    monkeypatch.delenv("LEPTON_FAST_BACKEND")
    with pytest.raises(RuntimeError, match="cuda.*cannot run"):
        fused_kd_loss(s, t, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        fused_kd_loss(s, t, backend="gpu")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autocast_takes_the_inputs_as_given(device, backend):
    """Under torch.autocast the op casts nothing (no Autocast kernel): a bfloat16 student and a
    float32 teacher give, bit for bit, the loss and gradient they give outside it, in float32."""
    require(SPEC, device, backend)
    s, t = randn(4, 19, seed=91, dtype=torch.bfloat16, device=device), randn(4, 19, seed=92, device=device)
    labels = random_labels((4,), 19, seed=93, device=device)
    outside = ours(backend, s, t, temperature=2.0, labels=labels, alpha=0.3)
    with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
        inside = ours(backend, s, t, temperature=2.0, labels=labels, alpha=0.3)
    assert inside[0].dtype == torch.float32 and inside[1].dtype == torch.bfloat16
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_second_backward_raises(device, backend):
    require(SPEC, device, backend)
    s = randn(3, 10, seed=44, device=device).requires_grad_()
    loss = fused_kd_loss(s, randn(3, 10, seed=45, device=device), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_second_order_gradient_raises_and_names_the_reference(device, backend):
    """A MAML-style inner step differentiates the gradient again: every kernel refuses (its
    gradient is a constant) and names lepton_fast.reference's function, which gives it."""
    require(SPEC, device, backend)
    x, t = randn(5, 6, seed=46, device=device), randn(5, 9, seed=47, device=device)
    w0 = randn(9, 6, seed=48, device=device, scale=0.5)

    def outer_grad(loss_fn, dtype, **kw):
        w = w0.to(dtype).clone().requires_grad_()
        loss = loss_fn(x.to(dtype) @ w.T, t.to(dtype), 2.0, **kw)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        (outer,) = torch.autograd.grad((w - 0.1 * g).square().sum(), w)
        return outer

    for chosen in (backend, "reference"):
        with pytest.raises(RuntimeError, match=r"second-order.*lepton_fast\.reference\.fused_kd_loss"):
            outer_grad(fused_kd_loss, torch.float32, backend=chosen)
    want = outer_grad(reference.fused_kd_loss, torch.float64)
    torch.testing.assert_close(outer_grad(reference.fused_kd_loss, torch.float32).double(), want, **TOL)


def test_other_cpu_instruction_sets():
    """The row kernels are compiled for the portable baseline, AVX2 and AVX-512 and follow
    ATen's choice; ATEN_CPU_CAPABILITY lowers it, so this machine runs the other builds too."""
    require(SPEC, "cpu", "cpu")
    script = textwrap.dedent("""
        import itertools, torch
        from lepton_fast import fused_kd_loss, reference
        print(torch.backends.cpu.get_cpu_capability())
        g = torch.Generator().manual_seed(0)
        for dtype, div in itertools.product([torch.float32, torch.bfloat16, torch.float64], ["forward_kl", "reverse_kl", "jsd"]):
            s = (torch.randn(5, 77, generator=g) * 3).to(dtype)
            t = (torch.randn(5, 77, generator=g) * 3).to(dtype)
            t[:, ::9] = float("-inf"); s[:, ::9] = float("-inf")
            y = torch.randint(0, 77, (5,), generator=g); y[0] = -100
            kw = dict(divergence=div, beta=0.3, labels=y, alpha=0.3, label_smoothing=0.1, reduction="none")
            x = s.clone().requires_grad_(); loss = fused_kd_loss(x, t, 3.0, backend="cpu", **kw); loss.sum().backward()
            xr = s.double().requires_grad_(); ref = reference.fused_kd_loss(xr, t.double(), 3.0, **kw); ref.sum().backward()
            tol = 1e-5 if dtype != torch.bfloat16 else 1e-2
            torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.grad.double(), xr.grad, atol=tol, rtol=tol)
        # Past the non-temporal store size (32 MiB) with odd C: streamed and stored rows.
        s, t = torch.randn(257, 32771, generator=g) * 3, torch.randn(257, 32771, generator=g) * 3
        x = s.clone().requires_grad_(); fused_kd_loss(x, t, 2.0, backend="cpu").backward()
        xr = s.double().requires_grad_(); reference.fused_kd_loss(xr, t.double(), 2.0).backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
        # Rows that disagree by far more than T (conftest.disagreeing_rows: swapped for reverse KL).
        for (a, b, T), div in itertools.product(ROWS.values(), ["forward_kl", "reverse_kl"]):
            s, t = torch.tensor([a]), torch.tensor([b])
            s, t = (s, t) if div == "forward_kl" else (t, s)
            got = fused_kd_loss(s, t, T, divergence=div, scale_by_t2=False, backend="cpu")
            want = reference.fused_kd_loss(s.double(), t.double(), T, divergence=div, scale_by_t2=False)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        print("ok")
    """).replace("ROWS", repr(DISAGREEING_ROWS))
    run_on_each_cpu_capability(script)


# --- Triton's column blocks: every boundary case, with a small block so that it shows --------


@TRITON_COLUMN_BLOCKS
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_column_blocks(n, c, block, divergence):
    require(SPEC, "cpu", "triton")
    from lepton_fast.kernels.kd_loss import fused_kd_loss as triton_kd_loss

    s, t = randn(n, c, seed=49).requires_grad_(False), randn(n, c, seed=50)
    labels = random_labels((n,), c, seed=51, ignore_every=2)
    hyper = kd_hyper(temperature=2.0, divergence=divergence, beta=0.3, alpha=0.4, label_smoothing=0.1)
    loss, grad = triton_kd_loss(s, t, labels, hyper, -100, "sum", None, True, block=block)
    ref_loss, ref_grad = oracle(s, t, temperature=2.0, divergence=divergence, beta=0.3, labels=labels, alpha=0.4,
                                label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)


# --- CUDA only: sizes the CPU suites cannot afford -------------------------------------------


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_llama3_vocab(backend):
    # Llama-3's vocabulary in bfloat16: the wide-row path over many column blocks.
    require(SPEC, "cuda", backend)
    s, t = randn(64, 128256, seed=52, dtype=torch.bfloat16, device="cuda"), \
        randn(64, 128256, seed=53, dtype=torch.bfloat16, device="cuda")
    labels = random_labels((64,), 128256, seed=54, device="cuda")
    kw = dict(temperature=2.0, labels=labels, alpha=0.4, label_smoothing=0.1)
    loss, grad = ours(backend, s, t, **kw)
    ref_loss, ref_grad = oracle(s, t, **kw)
    _, low_grad = loss_and_grad(reference.fused_kd_loss, s, t, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-4)
    ref_err = (low_grad.double() - ref_grad).abs().max().item()
    assert (grad.double() - ref_grad).abs().max().item() <= 2 * ref_err + 1e-6


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_more_than_2_31_elements(backend):
    # N*C > 2^31: the last rows start beyond int32 offsets (needs ~13 GB for s, t, grad).
    require(SPEC, "cuda", backend)
    c = 128256
    n = 2**31 // c + 8
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * c * 2 + (8 << 30):
        pytest.skip("not enough GPU memory for N*C > 2^31 in bfloat16")
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        rows = fused_kd_loss(s, t, 0.5, divergence="reverse_kl", reduction="none", backend=backend)
    for sl in (slice(0, 2), slice(n - 3, n)):
        want = reference.fused_kd_loss(s[sl].double(), t[sl].double(), 0.5, divergence="reverse_kl", reduction="none")
        torch.testing.assert_close(rows[sl].double(), want, atol=1e-5, rtol=1e-4)


# --- nn.KDLoss -----------------------------------------------------------------------------------


def test_kdloss_module_is_the_function():
    """nn.KDLoss holds the keywords and calls fused_kd_loss; the repr names them."""
    student, teacher = randn(6, 11, seed=40), randn(6, 11, seed=41)
    labels = random_labels((6,), 11, seed=42)
    kw = dict(divergence="jsd", beta=0.3, alpha=0.4, label_smoothing=0.1, reduction="sum")
    module = KDLoss(2.0, **kw)
    assert "divergence='jsd'" in repr(module) and "temperature=2.0" in repr(module)
    got = loss_and_grad(lambda s, t: module(s, t, labels), student, teacher)
    want = loss_and_grad(lambda s, t: fused_kd_loss(s, t, 2.0, labels=labels, **kw), student, teacher)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kw, error, match", [
    (dict(alpah=0.5), TypeError, "alpah"),
    (dict(labels=torch.zeros(2, dtype=torch.long)), TypeError, "labels"),
    (dict(temperature=-2.0), ValueError, "temperature"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction="none", num_items_in_batch=4), ValueError, "num_items_in_batch"),
])
def test_kdloss_refuses_bad_arguments_at_construction(kw, error, match):
    """Every value is checked when the module is built, by fused_kd_loss's own checks."""
    with pytest.raises(error, match=match):
        KDLoss(**kw)


def test_kdloss_leaves_the_labels_check_to_the_call():
    """alpha > 0 needs labels, which the call brings: the module builds, a call without them fails."""
    module = KDLoss(2.0, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        module(randn(3, 5, seed=43), randn(3, 5, seed=44))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_the_reference_takes_labels_of_any_integer_dtype(dtype):
    """The ops take labels of any integer dtype; the reference (the tests' oracle, and the
    second-order path) passed them to F.cross_entropy, which takes int64 only."""
    s, t = randn(4, 10, seed=3, dtype=torch.float64), randn(4, 10, seed=4, dtype=torch.float64)
    labels = torch.tensor([1, 2, 0, 9])
    lp, idx = torch.log_softmax(t, -1).topk(3, -1)
    for loss in (lambda y: reference.fused_kd_loss(s, t, 2.0, labels=y, alpha=0.5),
                 lambda y: reference.sparse_kd_loss(s, idx, lp, labels=y, alpha=0.5)):
        torch.testing.assert_close(loss(labels.to(dtype)), loss(labels), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("row", list(DISAGREEING_ROWS))
def test_kl_at_a_small_temperature_where_the_rows_disagree(row, divergence, device, backend):
    """Float32 forward and reverse KL at a small T, where the raw logits differ by 1e6-1e9 T:
    the kernels' KL sum takes each logit's offset from its row's max (kl_from_sums in
    csrc/kd_loss.h), so nothing of size |x_s - x_t| / T cancels, loss and gradient."""
    require(SPEC, device, backend)
    s, t, temperature = disagreeing_rows(row, divergence, device=device)
    s64 = s.double().cpu().requires_grad_()
    want = reference.fused_kd_loss(s64, t.double().cpu(), temperature, divergence=divergence, scale_by_t2=False)
    want.backward()
    x = s.clone().requires_grad_()
    got = fused_kd_loss(x, t, temperature, divergence=divergence, scale_by_t2=False, backend=backend)
    got.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    # The gradient is (an O(1) difference of log-probabilities) / T: 1e-5 of its scale.
    torch.testing.assert_close(x.grad.double().cpu(), s64.grad, rtol=1e-5, atol=1e-5 / temperature)


@pytest.mark.parametrize("device,backend", CPU_DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_data_error_reads_the_same_on_every_cpu_kernel(reduction, device, backend):
    """A label out of range and a row with no softmax: each kernel checks the data it reads
    (csrc/common.h, lepton_fast._validate), and every one names the op, the argument, the value
    and the row in the same words, whatever the reduction."""
    require(SPEC, device, backend)
    s, t = randn(4, 100, seed=5), randn(4, 100, seed=6)
    labels = torch.tensor([1, 2, 101, 3])
    with pytest.raises(ValueError, match=re.escape(
            "fused_kd_loss: labels must be in [0, 100) or equal ignore_index=-100; got 101 at row 2") + "$"):
        fused_kd_loss(s, t, labels=labels, alpha=0.5, reduction=reduction, backend=backend)
    undefined = re.escape("fused_kd_loss: row 1 of student_logits or teacher_logits is entirely -inf, or holds "
                          "+inf or NaN, so its softmax is undefined") + "$"
    # Row 1 entirely -inf, or one NaN among 100 finite logits of the student (forward KL's and
    # JSD's q) or the teacher (reverse KL's q), at a small T too: the CPU kernels' vector exp
    # maps NaN to a number, and their running max dropped it (a loss of +inf, not this error).
    for fill, temperature, divergence in [("-inf", 1.0, "forward_kl"), ("nan", 1e-3, "forward_kl"),
                                          ("nan", 1e-3, "reverse_kl"), ("nan", 1.0, "jsd")]:
        x, y = s.clone(), t.clone()
        bad = y if divergence == "reverse_kl" else x
        if fill == "-inf":
            bad[1] = -math.inf
        else:
            bad[1, 37] = math.nan
        with pytest.raises(ValueError, match=undefined):
            fused_kd_loss(x, y, temperature, divergence=divergence, reduction=reduction, backend=backend)

