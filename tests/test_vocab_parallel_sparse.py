"""vocab_parallel_sparse_kd_loss on 2 and 3 CPU ranks (gloo, spawned processes) against the
float64 oracle reference.sparse_kd_loss on the gathered logits.

One pool of three ranks serves every case (tests/rank_pool.py), and each test sends its whole
list of cases to the ranks in one round trip. The 37 classes of fresh random student logits
are split 19/18 over two ranks and 20/0/17 over three (the middle rank holds no class); every
rank generates the same logits and teacher and keeps its slice of the student. Each rank's
loss must be the oracle's on the whole logits, and the ranks' gradients side by side its
gradient.
"""
import contextlib
import os
import re

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from rank_pool import CollectiveRecorder, RankPool, recording_all_reduce
from lepton_fast import fused_linear_sparse_kd_loss, reference
from lepton_fast.distributed import vocab_parallel_sparse_kd_loss

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")
V = 37
# split name -> (index of its group in the pool, the slice sizes in rank order)
SPLITS = {"2": (0, (19, 18)), "3-empty": (1, (20, 0, 17))}
POOL_GROUPS = (2, 3)
F64_TOL = dict(atol=1e-12, rtol=1e-10)
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
TRUNCATIONS = ["renormalize", "tail"]


@pytest.fixture(scope="module")
def pool():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = RankPool(3, sizes=POOL_GROUPS)
    yield ranks
    ranks.close()


def data(seed, n=6, k=5, *, teacher="top_k", masked=False, labelled=False, ignore_value=-100,
         dtype=torch.float64, lead=None):
    """(student [n, V], indices [n, k], logprobs [n, k], mask or None, labels or None), the
    same on every rank. ``teacher``: "top_k" (distinct classes, the teacher's most likely, in a
    random order) or "random" (classes drawn with replacement: duplicates). ``masked``: a
    random third of the entries masked, and row 1 entirely. ``labelled``: a third of the rows
    labelled ``ignore_value`` ("all": every row). ``lead``: the rows as these leading dims."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    logp_all = torch.log_softmax(t, -1)
    if teacher == "top_k":
        _, idx = logp_all.topk(k, -1)
        idx = idx.gather(1, torch.argsort(torch.rand(n, k, generator=g), -1))
    else:
        idx = torch.randint(0, V, (n, k), generator=g)
    logp = logp_all.gather(1, idx)
    mask = None
    if masked:
        mask = torch.rand(n, k, generator=g) > 1 / 3
        mask[1] = False
        idx = torch.where(mask, idx, -7)  # a masked entry's index and value are not read
        logp = torch.where(mask, logp, float("nan"))
    labels = None
    if labelled:
        labels = torch.randint(0, V, (n,), generator=g)
        labels[::1 if labelled == "all" else 3] = ignore_value
    if lead is not None:  # the n rows as [*lead] leading dims
        return tuple(None if t is None else t.reshape(*lead, *t.shape[1:]) for t in (s, idx, logp, mask, labels))
    return s, idx, logp, mask, labels


def linear_data(seed, n=7, h=8, **teacher):
    """(student hidden [n, h], lm_head weight [V, h] and bias [V], then data()'s teacher
    entries, mask and labels), the same on every rank."""
    g = torch.Generator().manual_seed(seed + 1000)
    head = tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((n, h), (V, h), (V,)))
    return head + data(seed, n=n, **teacher)[1:]


# --- What each rank runs (module-level functions: the workers import them) -----------------


def _rank_slice(ctx, split):
    """(this rank's group of ``split``, the first and the end of its classes); the group is None
    on the ranks outside it."""
    index, sizes = SPLITS[split]
    return ctx.groups[index], sum(sizes[:ctx.rank]), sum(sizes[:ctx.rank + 1])


@contextlib.contextmanager
def _kernels(backend=None, block_elements=None):
    """For the block: the slice ops on ``backend`` ($LEPTON_FAST_BACKEND; None: the dispatcher's,
    the CPU C++ kernels), and reference.SPARSE_BLOCK_ELEMENTS (the blocks of rows of the
    reference kernels and of the test for duplicate entries) set to ``block_elements`` (None:
    left as it is)."""
    saved = reference.SPARSE_BLOCK_ELEMENTS, os.environ.pop("LEPTON_FAST_BACKEND", None)
    if block_elements is not None:
        reference.SPARSE_BLOCK_ELEMENTS = block_elements
    if backend is not None:
        os.environ["LEPTON_FAST_BACKEND"] = backend
    try:
        yield
    finally:
        reference.SPARSE_BLOCK_ELEMENTS = saved[0]
        os.environ.pop("LEPTON_FAST_BACKEND", None)
        if saved[1] is not None:
            os.environ["LEPTON_FAST_BACKEND"] = saved[1]


def _rank_cases(ctx, split, cases, block_elements=None, backend=None):
    """[(loss, gradient of this rank's slice)] per case on the ranks of ``split``; None off them."""
    group, lo, hi = _rank_slice(ctx, split)
    if group is None:
        return None
    out = []
    for data_kw, kw, grad_output in cases:
        s, idx, logp, mask, labels = data(**data_kw)
        x = s[..., lo:hi].clone().requires_grad_()
        with _kernels(backend, block_elements):
            loss = vocab_parallel_sparse_kd_loss(x, idx, logp, mask, group=group, labels=labels, **kw)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
        out.append((loss.detach(), x.grad))
    return out


class _NewSliceTensors(TorchDispatchMode):
    """Records the shape of every new tensor (not a view, not written in place) that an op
    returns with more than ``rows`` rows of ``width`` elements or more each."""

    def __init__(self, rows, width):
        super().__init__()
        self.rows, self.width, self.shapes = rows, width, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = all(r.alias_info is None for r in func._schema.returns)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (fresh and isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] > self.rows
                    and t[0].numel() >= self.width):
                self.shapes.append((func.__name__, tuple(t.shape)))
        return out


def _rank_slice_tensors(ctx, n, rows, kw):
    """The new tensors of more than ``rows`` rows of C_r elements or more that a forward on
    split "2" makes (with K = 5 entries, so that an [N, K, K] comparison of the entries would
    show too)."""
    group, lo, hi = _rank_slice(ctx, "2")
    if group is None:
        return None
    s, idx, logp, mask, labels = data(seed=23, n=n, teacher="random", masked=True, labelled=True)
    x = s[:, lo:hi].clone().requires_grad_()
    with _NewSliceTensors(rows, hi - lo) as recorder:
        vocab_parallel_sparse_kd_loss(x, idx, logp, mask, group=group, labels=labels, **kw)
    return recorder.shapes


def _rank_collectives(ctx, cases, n):
    """For each case: the collectives of a forward and of its backward on split "2"."""
    group, lo, hi = _rank_slice(ctx, "2")
    if group is None:
        return None
    out = []
    for data_kw, kw in cases:
        s, idx, logp, mask, labels = data(n=n, **data_kw)
        x = s[:, lo:hi].clone().requires_grad_()
        vocab_parallel_sparse_kd_loss(x, idx, logp, mask, group=group, labels=labels, **kw)  # sizes exchanged
        with CollectiveRecorder() as forward:
            loss = vocab_parallel_sparse_kd_loss(x, idx, logp, mask, group=group, labels=labels, **kw)
        with CollectiveRecorder() as backward:
            loss.backward()
        out.append((forward.calls, backward.calls))
    return out


def _rank_bad_call(ctx, what, form="logits"):
    """Each rank's error message for a bad call on three ranks, or None where it went through;
    ``form`` "linear": fused_linear_sparse_kd_loss(group=) on the rank's rows of a head."""
    group = dist.new_group([0, 1, 2])  # a fresh group: its first call exchanges the slice sizes
    sizes = SPLITS["3-empty"][1]
    lo, hi = sum(sizes[:ctx.rank]), sum(sizes[:ctx.rank + 1])
    h, w, b, idx, logp, mask, labels = linear_data(3, n=6, labelled=True)
    s = data(3, labelled=True)[0]
    kw = {}
    if what == "one rank refused":
        kw = dict(truncation="bogus") if ctx.rank == 1 else {}
    elif what == "index out of range":
        idx[2, 1] = V
    elif what == "undefined row":  # -inf on every rank: no softmax, whose mass "tail" needs
        s[1] = float("-inf")
        kw = dict(truncation="tail")
    elif what == "NaN teacher entry":  # beside -inf ones: the row passed as one with no listed mass
        logp[1] = float("-inf")
        logp[1, 0], mask, labels = float("nan"), None, None
        kw = dict(truncation="tail")
    try:
        if form == "linear":
            fused_linear_sparse_kd_loss(h, w[lo:hi], idx, logp, mask, student_bias=b[lo:hi], labels=labels,
                                        chunk_size=2, group=group, **kw)
        else:
            vocab_parallel_sparse_kd_loss(s[:, lo:hi], idx, logp, mask, group=group, labels=labels, **kw)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _rank_dtensor(ctx, cases):
    """[(loss, its placements, the student's whole gradient)] per case, the student a DTensor
    placed Shard(-1) over the three ranks (13/13/11 classes), the teacher replicated DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = ctx.cache.setdefault("mesh", init_device_mesh("cpu", (3,)))
    out = []
    for data_kw, kw in cases:
        s, idx, logp, mask, labels = data(**data_kw)
        x = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
        rep = lambda t: None if t is None else distribute_tensor(t, mesh, [Replicate()])  # noqa: E731
        loss = vocab_parallel_sparse_kd_loss(x, rep(idx), rep(logp), rep(mask), labels=rep(labels), **kw)
        loss.backward()
        out.append((loss.to_local(), tuple(map(repr, loss.placements)), x.grad.full_tensor()))
    return out


def _rank_linear(ctx, split, cases):
    """fused_linear_sparse_kd_loss(group=) on this rank's rows of the head, chunks of 3 rows, per
    case: (loss, d hidden, d weight slice, d bias slice, the all-reduces of the forward and of
    the backward)."""
    group, lo, hi = _rank_slice(ctx, split)
    if group is None:
        return None
    out = []
    for data_kw, kw in cases:
        h_s, w_s, b_s, idx, logp, mask, labels = linear_data(**data_kw)
        h, w, b = (x.clone().requires_grad_() for x in (h_s, w_s[lo:hi], b_s[lo:hi]))
        forward, backward = [], []
        with recording_all_reduce(forward):
            loss = fused_linear_sparse_kd_loss(h, w, idx, logp, mask, student_bias=b, labels=labels, chunk_size=3,
                                               group=group, **kw)
        with recording_all_reduce(backward):
            loss.backward()
        out.append((loss.detach(), h.grad, w.grad, b.grad, forward, backward))
    return out


# --- The tests --------------------------------------------------------------------------------


def oracle(data_kw, kw, grad_output=None):
    s, idx, logp, mask, labels = data(**data_kw)
    x = s.double().clone().requires_grad_()
    loss = reference.sparse_kd_loss(x, idx, logp, mask, labels=labels, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad


def assert_cases_match(pool, split, cases, tol=F64_TOL, block_elements=None, backend=None):
    answers = [a for a in pool.run(_rank_cases, split, cases, block_elements, backend) if a is not None]
    assert len(answers) == len(SPLITS[split][1])
    for i, (data_kw, kw, grad_output) in enumerate(cases):
        want_loss, want_grad = oracle(data_kw, kw, grad_output)
        grad = torch.cat([a[i][1] for a in answers], -1)
        for rank_answers in answers:
            loss = rank_answers[i][0]
            assert loss.dtype == torch.float64
            torch.testing.assert_close(loss.double(), want_loss, **tol, msg=lambda m: f"case {i} {data_kw} {kw}: {m}")
        torch.testing.assert_close(grad.double(), want_grad, **tol, msg=lambda m: f"case {i} {data_kw} {kw}: {m}")


def _every_divergence_and_truncation():
    """Both truncations and the three divergences, with and without the CE term, temperatures
    around 1, masked entries (an all-masked row) and ignored rows."""
    for truncation in TRUNCATIONS:
        for divergence in DIVERGENCES:
            base = dict(divergence=divergence, truncation=truncation, beta=0.3)
            yield dict(seed=1), dict(base, temperature=2.0), None
            yield dict(seed=2, masked=True, labelled=True), dict(base, temperature=0.7, alpha=0.3,
                                                                 label_smoothing=0.1), None
            yield (dict(seed=3, teacher="random", k=9, labelled=True),
                   dict(base, alpha=1.0 if divergence == "jsd" else 0.0), None)


@pytest.mark.parametrize("split", SPLITS)
def test_equals_the_oracle(pool, split):
    assert_cases_match(pool, split, list(_every_divergence_and_truncation()))


def test_edge_cases(pool):
    """K = 1, K = V (every class listed once: "tail" has no tail), duplicates, every entry
    masked, every row ignored, a small temperature (the student's tail far below its
    entries' mass), and the reductions with grad_output != 1 and num_items_in_batch."""
    go_rows = torch.linspace(-1, 2, 6, dtype=torch.float64)
    cases = []
    for truncation in TRUNCATIONS:
        kw = dict(truncation=truncation)
        cases += [
            (dict(seed=4, k=1), dict(kw, divergence="reverse_kl"), None),
            (dict(seed=5, k=V), dict(kw, divergence="jsd", temperature=1.5), None),
            (dict(seed=6, k=V, teacher="random", labelled=True), dict(kw, alpha=0.5), None),
            (dict(seed=7, k=12, teacher="random", masked=True), dict(kw, divergence="jsd", beta=0.7), None),
            (dict(seed=8, masked=True), dict(kw, temperature=0.05), None),
            (dict(seed=9, labelled=True), dict(kw, reduction="sum", alpha=0.2), torch.tensor(0.7, dtype=torch.float64)),
            (dict(seed=10, labelled=True), dict(kw, reduction="none", temperature=3.0, alpha=0.4), go_rows),
            (dict(seed=11, labelled=True), dict(kw, reduction="sum", num_items_in_batch=9, alpha=0.1), None),
            (dict(seed=12, labelled=True), dict(kw, reduction="mean", num_items_in_batch=torch.tensor(5.0)), None),
            (dict(seed=13, labelled=True, ignore_value=-1), dict(kw, ignore_index=-1, alpha=0.3), None),
            (dict(seed=14, k=7), dict(kw, divergence="jsd", beta=0.0, scale_by_t2=False, temperature=2.0), None),
            (dict(seed=22, labelled=True, masked=True, lead=(2, 3)), dict(kw, reduction="none", alpha=0.2),
             go_rows.reshape(2, 3)),
        ]
    assert_cases_match(pool, "3-empty", cases)


# Elements per block of rows of the reference kernels (reference.SPARSE_BLOCK_ELEMENTS): 1, blocks of one row; 80,
# four rows on the slices of 17 to 20 classes (7 rows: a block of 4 and one of 3) and one
# block on the empty slice; 10**9, one block.
BLOCK_ELEMENTS = [1, 80, 10**9]


def _blocked_cases():
    """Both truncations with and without the CE term, every reduction, duplicates, an
    all-masked row and ignored rows, on 7 rows."""
    go_rows = torch.linspace(-1, 2, 7, dtype=torch.float64)
    for truncation in TRUNCATIONS:
        kw = dict(truncation=truncation, temperature=1.5)
        yield dict(seed=30, n=7, masked=True), dict(kw, divergence="jsd", beta=0.3), None
        yield dict(seed=31, n=7, teacher="random", k=9, labelled=True), dict(kw, alpha=0.4, label_smoothing=0.1), None
        yield dict(seed=32, n=7, masked=True, labelled=True), dict(kw, alpha=1.0, reduction="sum"), None
        yield (dict(seed=33, n=7, teacher="random", labelled=True), dict(kw, divergence="reverse_kl", reduction="none"),
               go_rows)
        yield (dict(seed=34, n=7, masked=True, labelled=True), dict(kw, alpha=0.2, reduction="batchmean"),
               torch.tensor(0.6, dtype=torch.float64))
        yield dict(seed=35, n=7, labelled=True), dict(kw, alpha=0.3, reduction="sum", num_items_in_batch=11), None
        yield dict(seed=36, n=7, labelled="all"), dict(kw, alpha=0.5), None


@pytest.mark.parametrize("block_elements", BLOCK_ELEMENTS)
@pytest.mark.parametrize("split", SPLITS)
def test_blocks_of_rows(pool, split, block_elements):
    """The reference kernels (LEPTON_FAST_BACKEND=reference) run on blocks of rows."""
    assert_cases_match(pool, split, list(_blocked_cases()), block_elements=block_elements, backend="reference")


@pytest.mark.parametrize("kw", [dict(truncation="tail", alpha=0.3, temperature=2.0),
                                dict(truncation="renormalize", divergence="jsd")])
def test_one_slice_sized_tensor(pool, kw):
    """The gradient is the only new tensor of more than 2 rows of C_r elements or more that a
    forward makes (9 rows): the CPU kernels read the slice in place, and the test for
    duplicate entries sorts [N, K]. (The reference kernels' blocks: test_sparse_slice_ops.py.)"""
    answers = pool.run(_rank_slice_tensors, 9, 2, kw)
    for shapes, width in zip(answers, SPLITS["2"][1]):
        assert [shape for _, shape in shapes] == [(9, width)], shapes


def test_every_row_ignored(pool):
    cases = [(dict(seed=15, n=4, labelled="all"), dict(truncation=t, alpha=0.5), None) for t in TRUNCATIONS]
    assert_cases_match(pool, "2", cases)
    assert all(oracle(*case)[0] == 0 for case in cases)


def test_float32_and_bfloat16_students(pool):
    """A low-precision slice accumulates in float32, as sparse_kd_loss does: the oracle on the
    student's values as the ranks had them (rounded to their dtype)."""
    cases = [(dict(seed=16, dtype=torch.float32, labelled=True),
              dict(truncation="tail", alpha=0.3, temperature=2.0), None),
             (dict(seed=17, dtype=torch.bfloat16, masked=True), dict(divergence="jsd"), None)]
    answers = [a for a in pool.run(_rank_cases, "3-empty", cases) if a is not None]
    assert [(a[0][0].dtype, a[1][0].dtype, a[1][1].dtype) for a in answers] == \
        [(torch.float32, torch.float32, torch.bfloat16)] * 3
    for i, (data_kw, kw, _) in enumerate(cases):
        s, idx, logp, mask, labels = data(**data_kw)
        x = s.double().requires_grad_()
        want = reference.sparse_kd_loss(x, idx, logp, mask, labels=labels, **kw)
        want.backward()
        tol = dict(atol=1e-5, rtol=1e-5) if data_kw["dtype"] == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        for rank_answers in answers:
            torch.testing.assert_close(rank_answers[i][0].double(), want.detach(), **tol)
        torch.testing.assert_close(torch.cat([a[i][1] for a in answers], -1).double(), x.grad, **tol)


def test_dtensor_shard_minus_one(pool):
    cases = [(dict(seed=20, masked=True, labelled=True), dict(truncation="tail", alpha=0.3, temperature=2.0)),
             (dict(seed=21), dict(divergence="jsd"))]
    answers = pool.run(_rank_dtensor, cases)
    for i, (data_kw, kw) in enumerate(cases):
        want_loss, want_grad = oracle(data_kw, kw)
        for rank_answers in answers:
            loss, placements, grad = rank_answers[i]
            assert placements == ("Replicate()",)
            torch.testing.assert_close(loss, want_loss, **F64_TOL)
            torch.testing.assert_close(grad, want_grad, **F64_TOL)


def test_collectives_per_step(pool):
    """A forward sends one MAX of [N, <= 2] and one SUM of [N, K + <= 4]: O(N K) bytes,
    whatever V; "renormalize" without the CE only the [N, K] logits at the entries; the
    backward nothing."""
    n, k = 6, 5
    cases = [(dict(seed=18, k=k), dict(truncation="renormalize")),
             (dict(seed=18, k=k, labelled=True), dict(truncation="renormalize", alpha=0.5)),
             (dict(seed=18, k=k), dict(truncation="tail", divergence="jsd")),
             (dict(seed=18, k=k, labelled=True), dict(truncation="tail", alpha=0.5, temperature=2.0)),
             (dict(seed=18, k=k, labelled=True), dict(truncation="tail", alpha=1.0))]
    expected = [[("SUM", k)], [("MAX", 1), ("SUM", k + 2)], [("MAX", 2), ("SUM", k + 2)],
                [("MAX", 2), ("SUM", k + 4)], [("MAX", 1), ("SUM", 2)]]
    for answer in pool.run(_rank_collectives, cases, n)[:2]:
        for (forward, backward), want in zip(answer, expected):
            assert forward == [("allreduce_", op, [(n, c)], torch.float64, n * c * 8) for op, c in want]
            assert backward == []


@pytest.mark.parametrize("what,message", [
    ("one rank refused", r"truncation must be one of|rank 1 of the group refused"),
    ("index out of range", r"teacher_indices must be in \[0, 37\)"),
    ("undefined row", r"^ValueError: vocab_parallel_sparse_kd_loss: row 1 of student_logits or teacher_logprobs is "
                      r"entirely -inf"),
    ("NaN teacher entry", r"^ValueError: vocab_parallel_sparse_kd_loss: row 1 of student_logits or teacher_logprobs "
                          r"is entirely -inf, or holds \+inf or NaN"),
])
def test_bad_input_raises_on_every_rank(pool, what, message):
    errors = pool.run(_rank_bad_call, what)
    _assert_every_rank_raised(what, message, errors)


@pytest.mark.parametrize("what,message", [
    ("one rank refused", r"truncation must be one of|rank 1 of the group refused"),
    ("index out of range", r"^ValueError: fused_linear_sparse_kd_loss: teacher_indices must be in \[0, 37\)"),
])
def test_fused_linear_bad_input_raises_on_every_rank(pool, what, message):
    _assert_every_rank_raised(what, message, pool.run(_rank_bad_call, what, "linear"))


def _assert_every_rank_raised(what, message, errors):
    if what == "one rank refused":  # rank 1 its own error, the others that rank 1 refused
        assert ["truncation must" in e for e in errors] == [False, True, False], errors
    for error in errors:
        assert error is not None and error.split(": ", 1)[0] in ("ValueError", "TypeError", "RefusedOnAnotherRank")
        assert re.search(message, error), error


def _linear_cases():
    """Both truncations and the three divergences through a soft-capped, scaled head, with
    masked entries and ignored rows and the CE term, and the reductions."""
    for truncation in TRUNCATIONS:
        for divergence in DIVERGENCES:
            yield (dict(seed=40, masked=True, labelled=True),
                   dict(truncation=truncation, divergence=divergence, beta=0.3, temperature=2.0, alpha=0.3,
                        label_smoothing=0.1, student_softcap=4.0, student_logit_scale=0.7))
        yield dict(seed=41, teacher="random", k=9), dict(truncation=truncation, reduction="sum")
        yield (dict(seed=42, labelled=True), dict(truncation=truncation, reduction="batchmean", num_items_in_batch=5,
                                                  temperature=0.7))


@pytest.mark.parametrize("split", SPLITS)
def test_fused_linear_over_a_vocabulary_sharded_head(pool, split):
    """fused_linear_sparse_kd_loss(group=): each rank its [V_r, H] rows of the head (19/18, or
    20/0/17: a rank without vocabulary takes part with its empty slice), the same loss as the
    single-process reference on the whole head, each rank the gradient of its weight and bias
    rows, and every rank the whole hidden-state gradient (all-reduced in the forward: per
    chunk the rows' all-reduces of vocab_parallel_sparse_kd_loss, then one [N, H]; the
    backward none)."""
    cases = list(_linear_cases())
    answers = [a for a in pool.run(_rank_linear, split, cases) if a is not None]
    assert len(answers) == len(SPLITS[split][1])
    for i, (data_kw, kw) in enumerate(cases):
        h_s, w_s, b_s, idx, logp, mask, labels = linear_data(**data_kw)
        h, w, b = (x.clone().requires_grad_() for x in (h_s, w_s, b_s))
        want = reference.fused_linear_sparse_kd_loss(h, w, idx, logp, mask, student_bias=b, labels=labels, **kw)
        want.backward()
        for loss, d_hidden, _, _, forward, backward in (a[i] for a in answers):
            torch.testing.assert_close(loss, want.detach(), **F64_TOL)
            torch.testing.assert_close(d_hidden, h.grad, **F64_TOL)
            assert forward[-1] == ("SUM", (7, 8)) and backward == [], (forward, backward)
        torch.testing.assert_close(torch.cat([a[i][2] for a in answers]), w.grad, **F64_TOL)
        torch.testing.assert_close(torch.cat([a[i][3] for a in answers]), b.grad, **F64_TOL)
    # The first case: 4 rows not ignored, in chunks of 3 and 1, each one MAX of [rows, 2] and one
    # SUM of [rows, K + 4] ("renormalize": the CE's max, then the entries' logits and the CE's sums).
    forward = answers[0][0][4]
    assert forward == [(op, (rows, k)) for rows in (3, 1) for op, k in (("MAX", 1), ("SUM", 5 + 2))] + \
        [("SUM", (7, 8))], forward


def test_needs_torch_distributed():
    s, idx, logp, _, _ = data(19)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_sparse_kd_loss(s, idx, logp)


def test_triton_kernels(pool):
    """The slice ops' Triton kernels (interpreted on these CPU tensors; the kernels of CUDA
    tensors) end to end on the split with an empty slice: both truncations, the CE term,
    duplicates, an all-masked row, ignored rows, K = 1."""
    from conftest import require
    from lepton_fast.ops import sparse_kd_loss as sparse_ops

    require(sparse_ops.SPEC, "cpu", "triton")  # triton installed; the slice ops' kernels are the test
    cases = [(dict(seed=40, teacher="random", k=9, masked=True, labelled=True),
              dict(truncation="tail", divergence="jsd", beta=0.3, alpha=0.3, label_smoothing=0.1, temperature=1.5),
              None),
             (dict(seed=41, k=1, labelled=True), dict(truncation="renormalize", alpha=0.4), None)]
    assert_cases_match(pool, "3-empty", cases, backend="triton")
