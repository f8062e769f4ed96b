"""vocab_parallel_kd_loss on 2-4 CPU ranks (gloo, spawned processes) against the
single-process fused_kd_loss and reference.py, in float64.

One pool of four ranks serves every case (tests/rank_pool.py). The 37 classes of fresh
random logits are split 19/18 over two ranks, 13/13/11 and 20/0/17 over three, 10/10/10/7
over four; every rank generates the same logits and keeps its slice. Each rank's loss must be
fused_kd_loss's on the whole logits, and the ranks' gradients side by side its gradient.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import require
from rank_pool import CollectiveRecorder, RankPool, WorkerError, recording_all_reduce
from lepton_fast import fused_kd_loss, fused_linear_kd_loss, fused_linear_sparse_kd_loss, reference
from lepton_fast.distributed import vocab_parallel_kd_loss
from lepton_fast.ops import kd_loss as kd_ops

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
N_CLASSES = 37
# split name -> (index of its group in the pool, the slice sizes in rank order)
SPLITS = {"2": (0, (19, 18)), "3": (1, (13, 13, 11)), "3-empty": (2, (20, 0, 17)), "4": (3, (10, 10, 10, 7))}
POOL_GROUPS = (2, 3, 3, 4)
F64_TOL = dict(atol=1e-12, rtol=1e-10)
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


@pytest.fixture(scope="module")
def pool():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # The ranks run the default kernel: CPU C++, or the reference kernel without the extension.
    ranks = RankPool(4, sizes=POOL_GROUPS)
    yield ranks
    ranks.close()


def data(seed, n, dtype=torch.float64, labelled=False):
    """(student, teacher, labels or None): the same on every rank; a third of the labels ignored."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = None
    if labelled:
        labels = torch.randint(0, N_CLASSES, (n,), generator=g)
        labels[::3] = -100
    return s, t, labels


def _set_backend(backend):
    if backend is None:
        os.environ.pop("LEPTON_FAST_BACKEND", None)
    else:
        os.environ["LEPTON_FAST_BACKEND"] = backend


# --- What each rank runs (module-level functions: the workers import them) -----------------


def _rank_loss(ctx, split, seed, n, kw, backend=None, grad_output=None):
    """(loss, gradient of this rank's slice) on the ranks of ``split``; None off them."""
    index, sizes = SPLITS[split]
    group = ctx.groups[index]
    if group is None:
        return None
    _set_backend(backend)
    try:
        s, t, labels = data(seed, n, labelled=kw.pop("labelled", False))
        lo = sum(sizes[:ctx.rank])
        x = s[:, lo:lo + sizes[ctx.rank]].clone().requires_grad_()
        loss = vocab_parallel_kd_loss(x, t[:, lo:lo + sizes[ctx.rank]], group=group, labels=labels, **kw)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
        return loss.detach(), x.grad
    finally:
        _set_backend(None)


def _rank_collectives(ctx, kw, n):
    """The collectives of a fresh group's first call, its backward, and a second call."""
    group = dist.new_group([0, 1, 2])  # every rank makes it; ranks 0-2 use it
    if ctx.rank > 2:
        return None
    sizes = SPLITS["3"][1]
    s, t, labels = data(5, n, labelled=kw.pop("labelled", False))
    lo = sum(sizes[:ctx.rank])
    x = s[:, lo:lo + sizes[ctx.rank]].clone().requires_grad_()
    t = t[:, lo:lo + sizes[ctx.rank]]
    with CollectiveRecorder() as first:
        loss = vocab_parallel_kd_loss(x, t, group=group, labels=labels, **kw)
    with CollectiveRecorder() as backward:
        loss.backward()
    with CollectiveRecorder() as second:
        vocab_parallel_kd_loss(x, t, group=group, labels=labels, **kw).backward()
    return first.calls, backward.calls, second.calls


def _mesh(ctx, kind):
    from torch.distributed.device_mesh import init_device_mesh

    if kind not in ctx.cache:
        ctx.cache[kind] = init_device_mesh("cpu", (4,) if kind == "1d" else (2, 2))
    return ctx.cache[kind]


def _placements(kind):
    from torch.distributed.tensor import Replicate, Shard

    return {"1d": [Shard(-1)], "2d-tp": [Replicate(), Shard(-1)], "2d-dp": [Shard(-1), Replicate()],
            "1d-rows": [Shard(0)]}[kind]


def _rank_dtensor(ctx, kind, seed, n, kw):
    """(loss, its placements, the student's gradient shard, its placements) for DTensors."""
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh(ctx, "1d" if kind.startswith("1d") else "2d")
    s, t, labels = data(seed, n, labelled=kw.pop("labelled", False))
    place = _placements(kind)
    x = distribute_tensor(s, mesh, place).requires_grad_()
    loss = vocab_parallel_kd_loss(x, distribute_tensor(t, mesh, place), labels=labels, **kw)
    loss.backward()
    return loss.to_local(), tuple(map(repr, loss.placements)), x.grad.full_tensor(), tuple(map(repr, x.grad.placements))


def _rank_loss_parallel(ctx, seed, n, temperature):
    """PyTorch's loss_parallel() with log_softmax + kl_div, and ours, on the same Shard(-1) input:
    (their loss, their gradient shard, our loss, our gradient shard)."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = _mesh(ctx, "1d")
    s, t, _ = data(seed, n)
    place = _placements("1d")
    theirs = distribute_tensor(s, mesh, place).requires_grad_()
    teacher = distribute_tensor(t, mesh, place)
    with loss_parallel():
        log_p_s = F.log_softmax(theirs / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / temperature, dim=-1)
        their_loss = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
        their_loss.backward()
    ours = distribute_tensor(s, mesh, place).requires_grad_()
    our_loss = vocab_parallel_kd_loss(ours, teacher, temperature)
    our_loss.backward()
    # The gradients in full: a leaf's gradient placement differs between torch releases
    # (Replicate() in 2.11, see test_dtensor_shard_minus_one).
    return (their_loss.full_tensor(), theirs.grad.full_tensor(), our_loss.to_local(), ours.grad.full_tensor())


def _rank_bad_call(ctx, what):
    """Each rank's error message for a bad call, or None where the call went through."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    s, t, labels = data(7, 4, labelled=True)
    try:
        if what == "labels range":
            index, sizes = SPLITS["3"]
            if ctx.groups[index] is None:
                return None
            lo = sum(sizes[:ctx.rank])
            labels[1] = N_CLASSES
            vocab_parallel_kd_loss(s[:, lo:lo + sizes[ctx.rank]], t[:, lo:lo + sizes[ctx.rank]],
                                   group=ctx.groups[index], labels=labels, alpha=0.5)
        elif what == "labels range, linear":  # row 4: the first of the second chunk of valid rows (1, 2, 4, 5)
            index, sizes = SPLITS["3"]
            if ctx.groups[index] is None:
                return None
            lo, hi = sum(sizes[:ctx.rank]), sum(sizes[:ctx.rank + 1])
            h_s, w_s, _, h_t, w_t, _, labels = linear_data(7)
            labels[4] = N_CLASSES
            fused_linear_kd_loss(h_s, w_s[lo:hi], h_t, w_t[lo:hi], group=ctx.groups[index], labels=labels, alpha=0.5,
                                 chunk_size=2)
        elif what in ("one rank refused", "one rank refused, linear"):  # a fresh group's first call
            group = dist.new_group([0, 1, 2])  # every rank makes every group
            if ctx.rank > 2:
                return None
            sizes = SPLITS["3"][1]
            lo, hi = sum(sizes[:ctx.rank]), sum(sizes[:ctx.rank + 1])
            temperature = -1.0 if ctx.rank == 1 else 2.0
            if what == "one rank refused":
                vocab_parallel_kd_loss(s[:, lo:hi], t[:, lo:hi], group=group, temperature=temperature)
            else:
                h_s, w_s, _, h_t, w_t, _, _ = linear_data(7)
                fused_linear_kd_loss(h_s, w_s[lo:hi], h_t, w_t[lo:hi], temperature, group=group)
        elif what == "slice sizes changed":
            index, sizes = SPLITS["2"]
            group = ctx.groups[index]
            if group is None:
                return None
            mine = sizes[ctx.rank]
            vocab_parallel_kd_loss(s[:, :mine], t[:, :mine], group=group)  # the group's first call, or not
            swapped = sizes[::-1][ctx.rank]  # 18 / 19 where the group has 19 / 18
            vocab_parallel_kd_loss(s[:, :swapped], t[:, :swapped], group=group)
        else:
            mesh = _mesh(ctx, "1d")
            x = distribute_tensor(s, mesh, _placements("1d-rows" if what == "rows sharded" else "1d"))
            teacher = distribute_tensor(t, mesh, [Replicate()] if what == "teacher replicated" else x.placements)
            group = None
            if what == "other group":  # ranks 0, 1 pass one group of two, ranks 2, 3 another
                pair = dist.new_group([2, 3])  # every rank makes every group
                group = ctx.groups[SPLITS["2"][0]] if ctx.rank < 2 else pair
            vocab_parallel_kd_loss(x, teacher, group=group)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# --- The tests --------------------------------------------------------------------------------


def single_process(seed, n, kw, grad_output=None):
    """(fused_kd_loss's loss and gradient on the whole logits (the default kernel), the reference's), float64."""
    kw = dict(kw)
    s, t, labels = data(seed, n, labelled=kw.pop("labelled", False))
    out = []
    for fn in (lambda x: fused_kd_loss(x, t, labels=labels, **kw),
               lambda x: reference.fused_kd_loss(x, t, labels=labels, **kw)):
        x = s.clone().requires_grad_()
        loss = fn(x)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
        out.append((loss.detach(), x.grad))
    return out


def assert_ranks_match(answers, seed, n, kw, grad_output=None):
    answers = [a for a in answers if a is not None]
    grad = torch.cat([g for _, g in answers], -1)
    for want_loss, want_grad in single_process(seed, n, kw, grad_output):
        for loss, _ in answers:
            assert loss.dtype == torch.float64
            torch.testing.assert_close(loss, want_loss, **F64_TOL)
        torch.testing.assert_close(grad, want_grad, **F64_TOL)


MODES = {
    "no_labels": dict(temperature=2.0),
    "labels_ignored_T1": dict(labelled=True),
    "alpha_smoothing_T2": dict(temperature=2.0, labelled=True, alpha=0.4, label_smoothing=0.1),
    "alpha1_ce_only": dict(temperature=1.5, labelled=True, alpha=1.0, label_smoothing=0.2),
}


def _cases():
    """Every mode and divergence over three ranks (13/13/11, and 20/0/17 with an empty slice);
    two and four ranks for the mode with every term."""
    for divergence in DIVERGENCES:
        for mode in MODES:
            for split in SPLITS:
                if split in ("3", "3-empty") or mode == "alpha_smoothing_T2":
                    yield pytest.param(divergence, mode, split, id=f"{divergence}-{mode}-{split}")


@pytest.mark.parametrize("divergence,mode,split", list(_cases()))
def test_equals_the_single_process_op(pool, divergence, mode, split):
    kw = dict(MODES[mode], divergence=divergence, beta=0.3)
    assert_ranks_match(pool.run(_rank_loss, split, 11, 6, dict(kw)), 11, 6, kw)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_grad_output(pool, reduction):
    kw = dict(temperature=3.0, divergence="jsd", labelled=True, alpha=0.2, reduction=reduction)
    go = (torch.linspace(-1, 2, 5, dtype=torch.float64) if reduction == "none"
          else torch.tensor(0.7, dtype=torch.float64))
    assert_ranks_match(pool.run(_rank_loss, "3", 12, 5, dict(kw), None, go), 12, 5, kw, go)
    if reduction == "sum":
        kw.update(num_items_in_batch=9)
        assert_ranks_match(pool.run(_rank_loss, "3", 12, 5, dict(kw)), 12, 5, kw)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_other_backends(pool, divergence, backend):
    # The Triton kernels (interpreted on these CPU tensors) and reference.py's slice ops.
    if backend == "triton":
        require(kd_ops.SLICE_SPEC, "cpu", "triton")
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, labelled=True, alpha=0.4, label_smoothing=0.1)
    assert_ranks_match(pool.run(_rank_loss, "3", 13, 4, dict(kw), backend), 13, 4, kw)


def _allreduces(op, *columns, n):
    return [("allreduce_", op, [(n, k)], torch.float64, n * k * 8) for k in columns]


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(divergence="forward_kl", temperature=2.0), [("MAX", 2), ("SUM", 3)]),
        (dict(divergence="reverse_kl"), [("MAX", 2), ("SUM", 3)]),
        (dict(divergence="forward_kl", labelled=True, alpha=0.5), [("MAX", 2), ("SUM", 4)]),
        (dict(divergence="reverse_kl", labelled=True, alpha=0.5, temperature=2.0), [("MAX", 2), ("SUM", 5)]),
        (dict(divergence="jsd"), [("MAX", 2), ("SUM", 2), ("SUM", 2)]),
        (dict(divergence="jsd", labelled=True, alpha=0.5, temperature=2.0), [("MAX", 2), ("SUM", 4), ("SUM", 2)]),
        (dict(labelled=True, alpha=1.0, temperature=2.0), [("MAX", 1), ("SUM", 2)]),
    ],
    ids=["fwd", "rev", "fwd+CE", "rev+CE@T2", "jsd", "jsd+CE@T2", "CE only"],
)
def test_collectives_per_step(pool, kw, expected):
    """Forward: all-reduces of [N, <= 3] columns (two for the KLs, three for the JSD), one or
    two columns more for the CE term; the backward none; the slice sizes exchanged once."""
    n = 6
    for answer in pool.run(_rank_collectives, dict(kw), n)[:3]:
        first, backward, second = answer
        want = [c for op, k in expected for c in _allreduces(op, k, n=n)]
        assert second == want
        assert backward == []
        assert first[0] == ("allgather_", None, [(1,)] * 3, torch.int64, 24)  # the sizes, once per group
        assert first[1:] == want


@pytest.mark.parametrize("kind", ["1d", "2d-tp", "2d-dp"])
def test_dtensor_shard_minus_one(pool, kind):
    """Shard(-1) DTensors on a 1-D mesh of four and on a 2-D mesh (the other dimension
    replicated): a replicated loss, and a gradient placed like the student."""
    kw = dict(temperature=2.0, divergence="reverse_kl", labelled=True, alpha=0.3)
    answers = pool.run(_rank_dtensor, kind, 14, 5, dict(kw))
    place = ("Shard(dim=1)",) if kind == "1d" else (("Replicate()", "Shard(dim=1)") if kind == "2d-tp"
                                                    else ("Shard(dim=1)", "Replicate()"))
    # torch 2.11 accumulates the gradient of a Shard(-1) leaf as Replicate() whatever the op's
    # backward hands back (to_local(grad_placements=...) included); from 2.12 it stays sharded.
    sharded_grad = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)
    ((want_loss, want_grad), _) = single_process(14, 5, kw)
    for loss, loss_place, grad, grad_place in answers:
        assert loss_place == ("Replicate()",) * len(place)
        assert grad_place == place or not sharded_grad
        torch.testing.assert_close(loss, want_loss, **F64_TOL)
        torch.testing.assert_close(grad, want_grad, **F64_TOL)


def test_loss_parallel_gets_the_kd_gradient_wrong_and_we_do_not(pool):
    """pytorch#190746: under loss_parallel(), log_softmax's backward passes its input through
    (right for F.cross_entropy, whose backward forms softmax - one-hot itself), so
    log_softmax + kl_div has the right loss and a gradient without the softmax term."""
    temperature = 2.0
    answers = pool.run(_rank_loss_parallel, 15, 6, temperature)
    ((want_loss, want_grad), _) = single_process(15, 6, dict(temperature=temperature))
    theirs = answers[0][1]
    ours = answers[0][3]
    for their_loss, _, our_loss, _ in answers:
        torch.testing.assert_close(their_loss, want_loss, **F64_TOL)  # their loss is right
        torch.testing.assert_close(our_loss, want_loss, **F64_TOL)
    torch.testing.assert_close(ours, want_grad, **F64_TOL)
    # Theirs is -p_t T / N, the gradient with respect to log p_s, not (p_s - p_t) T / N. If this
    # fails, PyTorch has fixed it: say so in vocab_parallel_kd_loss's docstring and the README.
    s, t, _ = data(15, 6)
    torch.testing.assert_close(theirs, -torch.softmax(t / temperature, -1) * temperature / 6, **F64_TOL)
    assert (theirs - want_grad).abs().max() > 0.01


@pytest.mark.parametrize(
    "what,message",
    [
        ("labels range", r"labels must be in \[0, 37\)"),
        ("labels range, linear",  # the row in the caller's batch where the kernel says one (the C++ kernels)
         r"^ValueError: fused_linear_kd_loss: labels must be in \[0, 37\) or equal ignore_index=-100; "
         r"got (37 at row 4|\[37\])$"),
        ("one rank refused", r"temperature must be a finite number in \(0, inf\)|rank 1 of the group refused"),
        ("one rank refused, linear",
         r"temperature must be a finite number in \(0, inf\)|rank 1 of the group refused"),
        ("slice sizes changed", "student_logits: this rank's slice of the classes has"),
        ("rows sharded", r"student_logits must be a DTensor placed Shard\(-1\)"),
        ("teacher replicated", "teacher_logits must be placed like student_logits"),
        ("other group", "group must be None or the group of the mesh dimension 0"),
    ],
)
def test_bad_input_raises_on_every_rank(pool, what, message):
    ranks = 3 if what.startswith(("labels range", "one rank refused")) else 2 if what == "slice sizes changed" else 4
    errors = pool.run(_rank_bad_call, what)[:ranks]
    if what.startswith("one rank refused"):  # rank 1 its own error, the others that rank 1 refused
        assert ["temperature must" in e for e in errors] == [False, True, False], errors
    for error in errors:
        assert error is not None and error.split(": ", 1)[0] in ("ValueError", "TypeError", "RefusedOnAnotherRank")
        assert re.search(message, error), error


def test_needs_torch_distributed():
    s = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_kd_loss(s, s)


def test_a_rank_that_raises_fails_the_case(pool):
    """The pool reports a rank's exception (and stays usable): the tests above can fail."""
    with pytest.raises(WorkerError) as info:
        pool.run(_rank_loss, "2", 1, 3, dict(temperature=-1.0))
    assert [r for r, *_ in info.value.failures] == [0, 1]
    assert all("temperature" in msg for _, _, msg in info.value.failures)
    assert pool.run(_rank_loss, "2", 1, 3, dict())[0] is not None


def test_undefined_row_raises_everywhere(pool):
    # A row that is -inf on every rank has no softmax: every rank says so, none hangs.
    with pytest.raises(WorkerError) as info:
        pool.run(_rank_inf_row, "3")
    assert len(info.value.failures) == 3
    assert all("entirely -inf" in msg for *_, msg in info.value.failures)


def _rank_inf_row(ctx, split):
    index, sizes = SPLITS[split]
    if ctx.groups[index] is None:
        return None
    s, t, _ = data(16, 3)
    s[1] = -math.inf
    lo = sum(sizes[:ctx.rank])
    return vocab_parallel_kd_loss(s[:, lo:lo + sizes[ctx.rank]], t[:, lo:lo + sizes[ctx.rank]],
                                  group=ctx.groups[index])


def linear_data(seed, n=7, h_s=8, h_t=6):
    """(student hidden, weight, bias, teacher hidden, weight, bias, labels): two lm_heads over
    the 37 classes, the same on every rank; a third of the labels ignored."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    labels[::3] = -100
    return r(n, h_s), r(N_CLASSES, h_s), r(N_CLASSES), r(n, h_t), r(N_CLASSES, h_t), r(N_CLASSES), labels


def _rank_linear(ctx, split, seed, kw):
    """fused_linear_kd_loss(group=) on this rank's rows of both heads: (loss, d hidden, d weight
    slice, d bias slice, the all-reduces of the forward, the collectives of the backward)."""
    index, sizes = SPLITS[split]
    group = ctx.groups[index]
    if group is None:
        return None
    h_s, w_s, b_s, h_t, w_t, b_t, labels = linear_data(seed)
    lo, hi = sum(sizes[:ctx.rank]), sum(sizes[:ctx.rank + 1])
    h, w, b = (x.clone().requires_grad_() for x in (h_s, w_s[lo:hi], b_s[lo:hi]))
    forward, backward = [], []
    with recording_all_reduce(forward):
        loss = fused_linear_kd_loss(h, w, h_t, w_t[lo:hi], student_bias=b, teacher_bias=b_t[lo:hi], labels=labels,
                                    chunk_size=3, group=group, **kw)
    with recording_all_reduce(backward):
        loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad, forward, backward


@pytest.mark.parametrize("split", ["3", "3-empty"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_kd_loss_over_a_vocabulary_sharded_head(pool, divergence, split):
    """fused_linear_kd_loss(group=): each rank its [V_r, H] rows of both heads (13/13/11, or
    20/0/17: a rank without vocabulary takes part with its empty slice), the
    same loss as the single-process reference on the whole heads, each rank the gradient of its
    weight and bias rows, and every rank the whole hidden-state gradient (all-reduced in the
    forward: per chunk the loss's all-reduces, then one [N, H_s]; the backward none)."""
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, alpha=0.3, label_smoothing=0.1,
              student_softcap=4.0, teacher_logit_scale=0.7)
    answers = pool.run(_rank_linear, split, 17, kw)[:3]
    h_s, w_s, b_s, h_t, w_t, b_t, labels = linear_data(17)
    h, w, b = (x.clone().requires_grad_() for x in (h_s, w_s, b_s))
    want = reference.fused_linear_kd_loss(h, w, h_t, w_t, student_bias=b, teacher_bias=b_t, labels=labels, **kw)
    want.backward()
    for loss, d_hidden, _, _, forward, backward in answers:
        torch.testing.assert_close(loss, want.detach(), **F64_TOL)
        torch.testing.assert_close(d_hidden, h.grad, **F64_TOL)
        # 4 valid rows in chunks of 3: two chunks, each MAX [rows, 2] and SUM [rows, 5] (KL, the CE at T=2),
        # for the JSD SUM [rows, 4] and [rows, 2]; then the hidden-state gradient.
        per_chunk = [("MAX", 2), ("SUM", 4), ("SUM", 2)] if divergence == "jsd" else [("MAX", 2), ("SUM", 5)]
        assert forward == [(op, (rows, k)) for rows in (3, 1) for op, k in per_chunk] + [("SUM", (7, 8))]
        assert backward == []
    torch.testing.assert_close(torch.cat([a[2] for a in answers]), w.grad, **F64_TOL)
    torch.testing.assert_close(torch.cat([a[3] for a in answers]), b.grad, **F64_TOL)


@pytest.mark.parametrize("teacher", ["live", "sparse"])
@pytest.mark.parametrize("kw,refused", [(dict(reduction="none"), "reduction 'none'"),
                                       (dict(vocab_size=30), "vocab_size")])
def test_linear_kd_loss_group_refuses(kw, refused, teacher):
    """fused_linear_kd_loss and fused_linear_sparse_kd_loss (a teacher's stored top-4) refuse
    what their vocabulary-parallel loop does not do, before any collective."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = linear_data(18)
    with pytest.raises(ValueError, match=f"group=: not with {re.escape(refused)}"):
        if teacher == "live":
            fused_linear_kd_loss(h_s, w_s, h_t, w_t, group=object(), **kw)
        else:
            logprobs, indices = torch.log_softmax(h_t @ w_t.T, -1).topk(4, -1)
            fused_linear_sparse_kd_loss(h_s, w_s, indices, logprobs, group=object(), **kw)


def test_example_runs_under_torchrun():
    """examples/vocab_parallel_kd.py as the README runs it (--standalone: a free port, since
    other jobs may hold torchrun's default one), with its check against fused_kd_loss."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(root / "examples" / "vocab_parallel_kd.py"), "--steps", "3", "--vocab", "1001", "--check"],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 0 holds 501 of 1001 classes" in proc.stdout and ": equal" in proc.stdout, proc.stdout
