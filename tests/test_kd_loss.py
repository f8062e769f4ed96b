"""fused_kd_loss on every compiled backend for CPU tensors, against reference.py in float64.

Inputs are fresh random logits (seeded per test, never zeros). float32 results must be within
1e-5 (abs and rel) of the float64 reference; bfloat16/float16 gradients within 2x the error of
the reference run in that same dtype (the loss is float32 in every case and gets the float32
tolerance).
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import compiled_backends, low_precision_tolerance
from lepton_fast import fused_kd_loss, reference
from lepton_fast.ops.kd_loss import SPEC

BACKENDS = compiled_backends(SPEC, "cpu")
# Big rows only on the C++ kernel: Triton's interpreter would take minutes over them.
BIG_BACKENDS = [b for b in BACKENDS if b == "cpu"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["mean", "batchmean", "sum", "none"]
TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def random_labels(shape, n_classes, seed, ignore_every=3):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, n_classes, shape, generator=g)
    labels.view(-1)[::ignore_every] = -100  # some rows ignored
    return labels


def loss_and_grad(fn, student, teacher, grad_output=None, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), s.grad


def ours(backend, student, teacher, grad_output=None, **kw):
    return loss_and_grad(
        lambda s, t, **k: fused_kd_loss(s, t, backend=backend, **k), student, teacher, grad_output, **kw
    )


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels_mode", ["no_labels", "labels_ignore", "labels_alpha"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_mode_float32(divergence, reduction, temperature, labels_mode, backend):
    # C = 37: not a multiple of any vector width, so every row has a tail.
    n, c = 6, 37
    s, t = randn(n, c, seed=1), randn(n, c, seed=2)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, reduction=reduction)
    if labels_mode != "no_labels":
        kw["labels"] = random_labels((n,), c, seed=3)
    if labels_mode == "labels_alpha":
        kw.update(alpha=0.4, label_smoothing=0.1)
    assert_matches(backend, s, t, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_alpha_one_is_cross_entropy(label_smoothing, temperature, backend):
    s, t = randn(5, 29, seed=4), randn(5, 29, seed=5)
    labels = random_labels((5,), 29, seed=6)
    loss, _ = assert_matches(backend, s, t, temperature=temperature, labels=labels, alpha=1.0,
                             label_smoothing=label_smoothing)
    ce = torch.nn.functional.cross_entropy(s.double(), labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.double(), ce, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_ends_are_the_kls(beta, backend):
    s, t = randn(4, 33, seed=7), randn(4, 33, seed=8)
    jsd = fused_kd_loss(s, t, 2.0, divergence="jsd", beta=beta, backend=backend)
    kl = fused_kd_loss(s, t, 2.0, divergence="forward_kl" if beta == 0 else "reverse_kl", backend=backend)
    torch.testing.assert_close(jsd, kl, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_without_grad_is_the_same(divergence, backend):
    # No gradient wanted: the kernel skips its gradient pass (one pass for the KLs).
    s, t = randn(7, 300, seed=9), randn(7, 300, seed=10)
    with torch.no_grad():
        loss = fused_kd_loss(s, t, 2.0, divergence=divergence, reduction="none", backend=backend)
    ref = reference.fused_kd_loss(s.double(), t.double(), 2.0, divergence=divergence, reduction="none")
    torch.testing.assert_close(loss.double(), ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision(divergence, dtype, backend):
    n, c = 8, 300
    s, t = randn(n, c, seed=11, dtype=dtype), randn(n, c, seed=12, dtype=dtype)
    kw = dict(temperature=2.0, divergence=divergence, labels=random_labels((n,), c, seed=13), alpha=0.3,
              label_smoothing=0.1)
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
    yield pytest.param((1, 50), "cpu_and_triton", id="N=1")
    yield pytest.param((9, 1), "cpu_and_triton", id="C=1: every softmax is 1, loss 0")
    yield pytest.param((2, 3, 40), "cpu_and_triton", id="[B,T,C] leading dims")
    yield pytest.param((3, 50257), "big", id="C=50257 GPT-2 vocabulary, odd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape,kind", list(_shapes()))
def test_shapes(shape, kind, divergence, backend):
    if kind == "big" and backend not in BIG_BACKENDS:
        pytest.skip("big rows run on the C++ kernel only (Triton interpreter too slow)")
    s, t = randn(*shape, seed=14), randn(*shape, seed=15)
    labels = random_labels(shape[:-1], shape[-1], seed=16)
    for reduction in ("mean", "none"):
        loss, _ = assert_matches(backend, s, t, temperature=2.0, divergence=divergence, labels=labels,
                                 alpha=0.25, reduction=reduction)
        assert loss.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_non_contiguous(view, backend):
    if view == "transposed":  # [C, N] storage seen as [N, C]: stride along C is not 1
        s, t = randn(40, 6, seed=17).t(), randn(40, 6, seed=18).t()
    else:  # every other row and a window of classes: row stride != C
        s, t = randn(12, 60, seed=17)[::2, 5:45], randn(12, 60, seed=18)[::2, 5:45]
    assert not s.is_contiguous()
    assert_matches(backend, s, t, temperature=2.0, divergence="jsd", labels=random_labels((6,), 40, seed=19),
                   alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_neg_inf_masks(divergence, backend):
    n, c = 5, 70
    s, t = randn(n, c, seed=20), randn(n, c, seed=21)
    both = torch.zeros(n, c, dtype=torch.bool)
    both[:, ::7] = True  # vocabulary padding masked in both
    s[both], t[both] = -math.inf, -math.inf
    if divergence in ("forward_kl", "jsd"):
        t[:, 3::11] = -math.inf  # the teacher rules classes out: they add nothing
    if divergence in ("reverse_kl", "jsd"):
        s[:, 5::13] = -math.inf  # the student rules classes out
    loss, grad = assert_matches(backend, s, t, temperature=2.0, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[both] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_loss_is_the_true_value(backend):
    # The student rules out a class the teacher allows: KL(p_t || p_s) is +inf, not NaN.
    s, t = randn(3, 20, seed=22), randn(3, 20, seed=23)
    s[1, 4] = -math.inf
    loss = fused_kd_loss(s, t, reduction="none", backend=backend)
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(reduction, backend):
    s, t = randn(4, 30, seed=24), randn(4, 30, seed=25)
    s[2] = -math.inf  # an ignored row may hold anything
    labels = torch.full((4,), -100)
    loss, grad = ours(backend, s, t, labels=labels, alpha=0.5, reduction=reduction)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_not_one(backend):
    s, t = randn(6, 45, seed=26), randn(6, 45, seed=27)
    labels = random_labels((6,), 45, seed=28)
    assert_matches(backend, s, t, torch.tensor(3.7), temperature=2.0, labels=labels, alpha=0.3)
    assert_matches(backend, s, t, torch.tensor(-0.25), divergence="reverse_kl", reduction="sum")
    assert_matches(backend, s, t, randn(6, seed=29), divergence="jsd", reduction="none", labels=labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(divergence, backend):
    s = randn(3, 7, seed=30, dtype=torch.float64, scale=1.0).requires_grad_()
    t = randn(3, 7, seed=31, dtype=torch.float64, scale=1.0)
    labels = torch.tensor([2, -100, 6])
    # Each case compiles the same lambda anew; without a reset the later cases hit dynamo's
    # recompile limit, which fullgraph=True turns into an error.
    torch.compiler.reset()
    for reduction in ("mean", "none"):
        # gradcheck runs several backwards through one graph, which the eager op refuses (its
        # backward scales the saved gradient in place, see test_second_backward_raises). Traced
        # by AOTAutograd the backward is out of place, and the forward is still the kernel.
        fn = torch.compile(
            lambda x: fused_kd_loss(x, t, 1.5, divergence=divergence, labels=labels, alpha=0.3,
                                    label_smoothing=0.1, reduction=reduction, backend=backend),
            backend="aot_eager", fullgraph=True,
        )
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    s = randn(4, 19, seed=32).requires_grad_()
    t = randn(4, 19, seed=33)
    labels = random_labels((4,), 19, seed=34)
    for args in [
        (s, t, labels, 2.0, "forward_kl", 0.5, 0.3, 0.1, -100, True, "mean", True, backend),
        (s, t, None, 1.0, "jsd", 0.3, 0.0, 0.0, -100, False, "none", True, backend),
        (s.detach(), t, None, 0.5, "reverse_kl", 0.5, 0.0, 0.0, -100, True, "sum", False, backend),
    ]:
        torch.library.opcheck(torch.ops.lepton_fast.kd_loss, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    s, t = randn(2, 3, 41, seed=35), randn(2, 3, 41, seed=36)
    labels = random_labels((2, 3), 41, seed=37)

    def step(x):
        return fused_kd_loss(x, t, 2.0, divergence="jsd", labels=labels, alpha=0.2, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grad = loss_and_grad(lambda x, _t: step(x), s, t)
    loss, grad = loss_and_grad(lambda x, _t: compiled(x), s, t)
    torch.testing.assert_close(loss, eager_loss, **TOL)
    torch.testing.assert_close(grad, eager_grad, **TOL)


BAD_INPUTS = [
    ("teacher shape", dict(teacher=randn(4, 11, seed=0)), ValueError, "teacher_logits"),
    ("labels shape", dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
    ("labels range", dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
    ("labels negative", dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels"),
    ("labels float", dict(labels=torch.zeros(4)), TypeError, "labels"),
    ("int logits", dict(student=torch.ones(4, 10, dtype=torch.long)), TypeError, "student_logits"),
    ("int teacher", dict(teacher=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_logits"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature inf", dict(temperature=math.inf), ValueError, "temperature"),
    ("temperature nan", dict(temperature=math.nan), ValueError, "temperature"),
    ("beta < 0", dict(divergence="jsd", beta=-0.1), ValueError, "beta"),
    ("beta > 1", dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    ("divergence", dict(divergence="kl"), ValueError, "divergence"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("alpha without labels", dict(alpha=0.5), ValueError, "labels"),
    ("alpha > 1", dict(alpha=1.5, labels=torch.tensor([0, 1, 2, 3])), ValueError, "alpha"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what,change,error,name", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, change, error, name, backend):
    kw = dict(student=randn(4, 10, seed=38), teacher=randn(4, 10, seed=39))
    kw.update(change)
    with pytest.raises(error, match=name):
        fused_kd_loss(kw.pop("student"), kw.pop("teacher"), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_all_neg_inf_row_is_an_error(which, backend):
    s, t = randn(3, 10, seed=40), randn(3, 10, seed=41)
    (s if which == "student" else t)[1] = -math.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        fused_kd_loss(s, t, backend=backend)


def test_backend_forcing(monkeypatch):
    s, t = randn(3, 10, seed=42), randn(3, 10, seed=43)
    calls = []
    real = reference.fused_kd_loss
    monkeypatch.setattr(reference, "fused_kd_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("LEPTON_FAST_BACKEND", "reference")
    loss = fused_kd_loss(s, t)
    assert calls == [1]
    for backend in BACKENDS:  # the keyword wins over the environment
        torch.testing.assert_close(fused_kd_loss(s, t, backend=backend), loss, **TOL)
    assert calls == [1]
    monkeypatch.setenv("LEPTON_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LEPTON_FAST_BACKEND"):
        fused_kd_loss(s, t)
    monkeypatch.delenv("LEPTON_FAST_BACKEND")
    with pytest.raises(RuntimeError, match="cuda.*cannot run"):
        fused_kd_loss(s, t, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        fused_kd_loss(s, t, backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_raises(backend):
    s = randn(3, 10, seed=44).requires_grad_()
    loss = fused_kd_loss(s, randn(3, 10, seed=45), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ CPU kernel")
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_other_cpu_instruction_sets(isa):
    """The row kernel is compiled for the portable baseline, AVX2 and AVX-512 and follows
    ATen's choice; ATEN_CPU_CAPABILITY lowers it, so this machine runs the other builds too."""
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
        print("ok")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    capability, status = out.stdout.split()
    assert capability.lower() == isa.lower() or isa == "avx2" and capability == "DEFAULT"
    assert status == "ok"


def test_kdloss_module_is_the_function():
    """nn.KDLoss holds the keywords and calls fused_kd_loss; the repr names them."""
    from lepton_fast import KDLoss

    student, teacher = randn(6, 11, seed=40), randn(6, 11, seed=41)
    labels = random_labels((6,), 11, seed=42)
    kw = dict(divergence="jsd", beta=0.3, alpha=0.4, label_smoothing=0.1, reduction="sum")
    module = KDLoss(2.0, **kw)
    assert "divergence='jsd'" in repr(module) and "temperature=2.0" in repr(module)
    got = loss_and_grad(lambda s, t: module(s, t, labels), student, teacher)
    want = loss_and_grad(lambda s, t: fused_kd_loss(s, t, 2.0, labels=labels, **kw), student, teacher)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kdloss_refuses_bad_arguments_at_construction():
    from lepton_fast import KDLoss

    with pytest.raises(TypeError, match="alpah"):
        KDLoss(2.0, alpah=0.5)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(-2.0)
