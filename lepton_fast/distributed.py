"""Knowledge distillation across ranks: the vocabulary-parallel KD losses (dense and sparse teacher).

When a language model's lm_head is split over its vocabulary (Megatron-LM's
ColumnParallelLinear, a DTensor placed ``Shard(-1)``), each rank holds the logits of a
contiguous slice of the classes. :func:`vocab_parallel_kd_loss` gives every rank the loss of
the gathered logits and the gradient of its own slice without any rank holding the whole
vocabulary: the fused KD kernels split at a row's steps (csrc/kd_loss.h, the ops
``kd_slice_*`` of lepton_fast.ops.kd_loss), with the rows' statistics all-reduced between them.

Per forward, for N rows (all-reduces over ``group``, in the statistics' dtype: float32, or
float64 for float64 logits):

- forward / reverse KL: MAX of [N, 2] (each row's maximum of the student's and the teacher's
  logits), then SUM of [N, 3] (the sums of exp((x - max) / T) of both sides against those
  maxima, and the KL's sum re-centred on both, ``SliceMerge``);
- JSD: the same two with [N, 2] sums, and a SUM of [N, 2] (K_t, K_s) once both
  log-sum-exps are known: three;
- the hard-label cross-entropy (alpha > 0) adds its linear part (label logit and smoothing
  sum) to the SUM, one more column, and at T != 1 its own sum of exponentials, a second;
- the backward: none (the gradient was written during the forward, as fused_kd_loss does).

``fused_linear_kd_loss(..., group=)`` (a vocabulary-sharded lm_head) runs the same
all-reduces per chunk of rows (:func:`chunk_loss_and_grad`), and one more of the hidden
states' gradient [N, H_s].

:func:`vocab_parallel_sparse_kd_loss` (a teacher stored as its top-k log-probabilities, the same
on every rank) runs at most one all-reduce MAX of [N, <= 2] and one SUM of [N, K + <= 4] per
forward (its docstring says which), none in the backward: O(N·K) bytes. Its per-rank work is two
passes over the slice, the ops ``sparse_slice_stats`` and ``sparse_slice_grad`` of
lepton_fast.ops.sparse_kd_loss (CPU C++ kernels; Triton kernels on CUDA tensors).

So the bytes sent per step are O(N) (O(N·K) for the sparse teacher), independent of the
vocabulary. The slices' sizes are exchanged once per process group (one all-gather of one
integer at the first call, cached), and never for DTensors, whose layout says them.

Argument errors: every argument is checked before the op's first collective, and at a group's
first call the size exchange carries each rank's verdict (-1 for refused arguments, ``refuse``;
vocab_parallel_kd_loss and fused_linear_kd_loss(group=) both), so that a rank-local error stops
every rank of the group: the refusing rank raises its own error, the others
``RefusedOnAnotherRank``. At later calls a rank whose arguments alone are
refused raises before its first collective while the others wait in theirs: agreeing on every
call would cost a host synchronisation per step. Arguments that are the same on every rank (as
documented) fail on every rank alike.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from lepton_fast import _validate
from lepton_fast.ops import _autograd
from lepton_fast.ops import kd_loss as kd_ops
from lepton_fast.ops import sparse_kd_loss as sparse_ops

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_sparse_kd_loss"]

Scalar = Union[float, Tensor]

# Each process group's slice sizes in rank order, from the one exchange at its first call.
_SLICE_SIZES: dict = {}


@_validate.kd_keywords
def vocab_parallel_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: Scalar = 1.0,
    *,
    group: Optional[dist.ProcessGroup] = None,
    **kd: Unpack[_validate.KDKeywords],
) -> Tensor:
    r""":func:`lepton_fast.fused_kd_loss` of logits whose classes are split over ranks.

    Each rank of ``group`` passes the logits of its contiguous slice of the C classes, in rank
    order (rank 0 the first classes); slices may differ in size, and may be empty. Every rank
    gets the loss of the gathered [..., C] logits, exactly as ``fused_kd_loss`` gives it on
    one device (Hinton, Vinyals & Dean 2015; the divergences, CE term and reductions of its
    docstring), and ``backward`` gives each rank the gradient of its own slice. No rank holds
    more than its slice: the rows' softmax statistics merge across ranks as the online
    softmax merges blocks of a row, in two all-reduces of [N, <= 3] for forward/reverse KL and
    three for the JSD (one or two more columns for the CE term), and none in the backward:
    the module docstring has the list. This is the scheme of Megatron-LM's
    vocabulary-parallel cross-entropy (Shoeybi et al. 2019, "Megatron-LM: Training
    Multi-Billion Parameter Language Models Using Model Parallelism"), which takes three
    all-reduces for the cross-entropy alone, extended to the KD divergences.

    Args:
        student_logits: [..., C_r] this rank's slice, float32, bfloat16, float16 or float64;
            gradient flows here. Or a DTensor placed ``Shard(-1)`` on one dimension of its
            device mesh and ``Replicate()`` on the others (a 1-D mesh, or a 2-D mesh whose
            other dimension replicates): the slices are its shards.
        teacher_logits: [..., C_r] the teacher's logits of the same slice (a DTensor placed like
            the student's when the student is one); a constant.
        temperature: as for ``fused_kd_loss``, the same on every rank.
        group: the process group the classes are split over (default: the world); with
            DTensors, the mesh dimension that shards the classes (None, or that dimension's group).
        KD_KEYWORDS
            Each the same on every rank; labels are class ids into the whole vocabulary
            [0, C) (a tensor, or a replicated DTensor).

    Returns:
        On every rank, the loss of the whole rows: a scalar, or [...] for ``"none"``; float32
        (float64 for float64 logits). For DTensor inputs a DTensor placed ``Replicate()``, and
        the student's gradient is a DTensor placed like the student (torch >= 2.12; torch 2.11
        accumulates a leaf's gradient as ``Replicate()``, with the same values).

    Raises:
        TypeError, ValueError: as ``fused_kd_loss`` (labels are checked against the whole
            vocabulary [0, C)); also a student slice whose size differs from the one this
            rank passed to the group before, DTensors placed other than above, a teacher placed
            otherwise than the student, or a ``group`` that is not the mesh's.
        RuntimeError: torch.distributed is not initialised.

    Why not ``torch.distributed.tensor.parallel.loss_parallel()``: it makes
    ``F.cross_entropy`` on ``Shard(-1)`` logits right by computing the softmax-minus-one-hot
    gradient in the cross-entropy's backward and letting ``log_softmax``'s backward pass its
    input through; composed with ``F.kl_div`` instead, the loss is right but the gradient
    misses the softmax term (pytorch#190746). Here the gradient comes from the same kernels
    as ``fused_kd_loss``'s.

    The size exchange: at a group's first call each rank sends its slice size (one
    all-gather of one integer); later calls check the size against it, so the split of the
    classes must stay the same for a group (pass another group, or DTensors, for another).
    """
    if _is_dtensor(student_logits) or _is_dtensor(teacher_logits):
        return _dtensor_loss(student_logits, teacher_logits, group, temperature, kd)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_kd_loss needs torch.distributed initialised (init_process_group)")
    group = dist.group.WORLD if group is None else group
    # Every argument is checked before the first collective: an error on one rank after another
    # had entered a collective would leave that one waiting for good. At a group's first call the
    # size exchange carries each rank's verdict, so that every rank raises.
    try:
        a = kd_ops.checked("vocab_parallel_kd_loss", student_logits, teacher_logits, slice_of_classes=True,
                           temperature=temperature, **kd)
    except (TypeError, ValueError) as error:
        refuse(group, error)
        raise
    class_offset, n_classes = _slice_of(group, a.student.shape[-1], a.student.device)
    return _sharded_loss(a, group, class_offset, n_classes)


def _sharded_loss(a: kd_ops.KDArgs, group, class_offset: int, n_classes: int) -> Tensor:
    """The loss of the whole rows on this rank, from its checked slice at class_offset of n_classes."""
    backend = kd_ops.slice_backend(a.student.device)
    merged, jsd_sums = _merged_statistics(backend, a, group, class_offset, n_classes)
    loss = kd_ops.slice_loss(backend, a, merged, jsd_sums, class_offset, n_classes)
    return loss.reshape(a.lead) if a.reduction == "none" else loss


def _merged_statistics(backend: str, a: kd_ops.KDArgs, group, class_offset: int,
                       n_classes: int) -> tuple[Tensor, Optional[Tensor]]:
    """Every row's statistics over the whole vocabulary (and the JSD's sums, else None), from
    this rank's slice and the all-reduces listed in the module docstring."""
    merge = kd_ops.SliceMerge(a.hyper)
    stats = kd_ops.slice_stats(backend, a, class_offset, n_classes)
    merged_max = merge.maxima(stats)
    dist.all_reduce(merged_max, op=dist.ReduceOp.MAX, group=group)
    sums = merge.rescaled(stats, merged_max)
    dist.all_reduce(sums, group=group)
    merged = merge.merged(merged_max, sums)
    jsd_sums = None
    if merge.jsd:
        jsd_sums = kd_ops.slice_jsd_sums(backend, a, merged)
        dist.all_reduce(jsd_sums, group=group)
    return merged, jsd_sums


@_validate.kd_keywords
def vocab_parallel_sparse_kd_loss(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_mask: Optional[Tensor] = None,
    temperature: Scalar = 1.0,
    *,
    group: Optional[dist.ProcessGroup] = None,
    truncation: str = "renormalize",
    **kd: Unpack[_validate.KDKeywords],
) -> Tensor:
    r""":func:`lepton_fast.sparse_kd_loss` of student logits whose classes are split over ranks.

    Each rank of ``group`` passes the student's logits of its contiguous slice of the V
    classes, in rank order (rank 0 the first classes; slices may differ in size, and may be
    empty), and the same teacher on every rank: its entries' global class ids, their stored
    log-probabilities and mask. Every rank gets the loss of the gathered [..., V] logits,
    exactly as ``sparse_kd_loss`` gives it on one device (its docstring has the buckets of
    the two truncations, the temperature, the entries that count, the CE term and the
    reductions), and ``backward`` gives each rank the gradient of its own slice.

    Per forward, for N rows and K entries (module docstring): at most one all-reduce MAX of
    [N, <= 2] (the row's max, and under "tail" the max of the classes no entry lists) and one
    all-reduce SUM of [N, K + <= 4] (the student's logits at the entries, each from the rank
    that holds it, and the sums of exponentials against those maxima that "tail" and the CE
    need, with the CE's linear part); "renormalize" without the CE needs only the [N, K]
    logits at the entries. The backward: none. So a step sends O(N·K) bytes whatever V.
    "tail" takes the student's mass outside the entries from the log-sum-exp of the classes
    not listed, with a max of its own, not as the whole row's mass minus the entries' (exact
    when that tail is far below the entries' mass, at a small T).

    What runs where: two passes over this rank's [N, V_r] slice, each one op
    (lepton_fast.ops.sparse_kd_loss; CPU C++ kernels in csrc/cpu/sparse_kd_loss.cpp, rows in
    parallel, at::vec per ISA). ``sparse_slice_stats`` reads the slice once and gives each row's
    statistics against the slice's own maxima (the max, the unlisted classes' max, their sums of
    exponentials, the CE's sum and linear part) and the entries' logits, [N, K + 6]; Python
    rescales the sums to the maxima merged by the MAX all-reduce (no second read) before the
    SUM. The rows' divergence and its derivatives with respect to the merged statistics
    ([N, <= K + 4], autograd: ``lepton_fast.reference.sparse_slice_rows``) give each row's
    gradient coefficients, and ``sparse_slice_grad`` writes the gradient in one more pass
    (1 to 3 exponentials an element), straight into the one [N, V_r] tensor of the slice's
    dtype: a step reads the slice twice and writes it once, and allocates nothing else of that
    size. The reduction ("mean"'s divisor, ``num_items_in_batch``) is over all rows, once.
    CUDA tensors run the ops' Triton kernels (kernels/sparse_kd_loss.py, the same passes, one
    program per row); without triton, the reference kernels (the tests' oracles in
    reference.py, on blocks of rows of ``reference.SPARSE_BLOCK_ELEMENTS`` so that their
    temporaries stay a few MiB).

    Args:
        student_logits: [..., V_r] this rank's slice, float32, bfloat16, float16 or float64;
            gradient flows here. Or a DTensor placed as for ``vocab_parallel_kd_loss``
            (``Shard(-1)`` on one mesh dimension, ``Replicate()`` on the others).
        teacher_indices: [..., K] integer class ids into the whole vocabulary [0, V), the same
            on every rank (a tensor, or a replicated DTensor, as are the mask and labels).
        teacher_logprobs, teacher_mask: [..., K], as for ``sparse_kd_loss``, the same on every
            rank.
        temperature, truncation: as for ``sparse_kd_loss``, the same on every rank.
        group: the process group the classes are split over (default: the world).
        KD_KEYWORDS
            Each the same on every rank; labels are class ids into the whole vocabulary.

    Returns:
        On every rank, the loss of the whole rows: a scalar, or [...] for ``"none"``; float32
        (float64 for float64 logits). For a DTensor student a DTensor placed ``Replicate()``.

    Raises:
        TypeError, ValueError: as ``sparse_kd_loss`` (teacher indices and labels are checked
            against the whole vocabulary [0, V)); also a slice whose size differs from the one
            this rank passed to the group before. A refusal at a group's first call stops every
            rank (``RefusedOnAnotherRank`` on the others), as for ``vocab_parallel_kd_loss``.
        RuntimeError: torch.distributed is not initialised; a second-order gradient, or a
            second backward through one graph.
    """
    if _is_dtensor(student_logits):
        from torch.distributed.tensor import DTensor, Replicate

        local, mesh, group, class_offset, n_classes = _dtensor_slice(student_logits, group)
        teacher_indices, teacher_logprobs, teacher_mask = (
            _replicated_local(name, x) for name, x in (("teacher_indices", teacher_indices),
                                                       ("teacher_logprobs", teacher_logprobs),
                                                       ("teacher_mask", teacher_mask)))
        kd = {**kd, "labels": _replicated_local("labels", kd.get("labels"))}
        split = (class_offset, n_classes)
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("vocab_parallel_sparse_kd_loss needs torch.distributed initialised (init_process_group)")
        local, group, split = student_logits, dist.group.WORLD if group is None else group, None
    try:  # every check before the first collective (vocab_parallel_kd_loss)
        _validate.logits("student_logits", local, empty_ok=True)
        indices, logprobs, mask = _validate.sparse_teacher(teacher_indices, teacher_logprobs, teacher_mask,
                                                           "student_logits", local)
        _validate.choice("truncation", truncation, sparse_ops.TRUNCATIONS)
        o = _validate.kd_options("vocab_parallel_sparse_kd_loss", "student_logits", local, temperature=temperature,
                                 **kd)
    except (TypeError, ValueError) as error:
        if split is None:
            refuse(group, error)
        raise
    student = _validate.as_rows(local)
    class_offset, n_classes = split or _slice_of(group, student.shape[-1], student.device)
    compute_grad = student.requires_grad and torch.is_grad_enabled()  # (the Function's forward runs without grad)
    backend = sparse_ops.slice_backend(student.device)
    loss = _SparseSliceLoss.apply(student, lambda: _sparse_sharded_loss(
        student, indices, logprobs, mask, o, truncation, compute_grad,
        VocabSplit(group, class_offset, n_classes, backend), "vocab_parallel_sparse_kd_loss"))
    loss = loss.reshape(local.shape[:-1]) if o.reduction == "none" else loss
    return loss if split is None else DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _sparse_sharded_loss(student: Tensor, indices: Tensor, logprobs: Tensor, mask: Optional[Tensor],
                         o: _validate.KDOptions, truncation: str, compute_grad: bool, split: "VocabSplit",
                         op: str) -> tuple[Tensor, Optional[Tensor]]:
    """(the loss of the whole rows, d(loss)/d(this rank's slice) or None): the slice's statistics
    (op sparse_slice_stats), the all-reduces of vocab_parallel_sparse_kd_loss, the rows' loss and
    gradient coefficients (reference.sparse_slice_rows, [N, K + 7]), the gradient (op
    sparse_slice_grad). The data errors name ``op``."""
    from lepton_fast import reference as ref  # the rows' step, on [N, K + small]
    from lepton_fast.ops._reference import autograd_on, hyper_keywords

    ignore_index, labels = o.ignore_index, o.labels
    group, class_offset, n_classes, backend = split
    # The arguments that are the same on every rank fail on every rank alike, before a collective.
    if labels is not None:
        _validate.labels_in_range(op, labels, n_classes, ignore_index)
    read = ref.sparse_teacher_entries(indices, mask, labels, ignore_index)
    _validate.teacher_indices_in_range(op, indices, read, n_classes)
    n_rows = indices.shape[0]
    counted = ref.sparse_counted_entries(indices, read)
    column = ref.sparse_slice_columns(indices, counted, class_offset, student.shape[-1])
    stats = sparse_ops.slice_stats(backend, student, column, labels, o.hyper, truncation, ignore_index, class_offset,
                                   n_classes)
    merge = sparse_ops.SliceMerge(o.hyper, truncation)
    merged_max = merge.maxima(stats)
    if merge.max_cols:
        dist.all_reduce(merged_max, op=dist.ReduceOp.MAX, group=group)
    sums = merge.rescaled(stats, merged_max)
    dist.all_reduce(sums, group=group)
    stats = merge.merged(stats, merged_max, sums)

    # The reduction is over all rows: its divisor is known before the gradient, which is written
    # already divided by it.
    divisor = ref.mean_divisor(labels, ignore_index, n_rows)
    with autograd_on():  # (inside fused_linear_sparse_kd_loss's op too, which runs below autograd)
        rows, coefficients = ref.sparse_slice_rows(
            counted, logprobs, labels, stats, truncation=truncation, ignore_index=ignore_index, n_classes=n_classes,
            coefficients=compute_grad, grad_divisor=ref.reduction_divisor(o.reduction, divisor, o.num_items),
            **hyper_keywords(ref.sparse_slice_rows, o.hyper))
    loss = ref.reduce_rows(rows, o.reduction, divisor, o.num_items)
    _validate.rows_defined(op, rows, "student_logits or teacher_logprobs")
    grad = None
    if compute_grad:
        grad = sparse_ops.slice_grad(backend, student, column, labels, coefficients, o.hyper, ignore_index,
                                     class_offset)
    return loss, grad


class _SparseSliceLoss(torch.autograd.Function):
    """The loss of ``compute()`` (loss, d(loss)/d(student) or None), whose gradient was written
    during the forward; the backward scales it by grad_output (ops/_autograd.py)."""

    @staticmethod
    def forward(ctx, student, compute):
        loss, grad = compute()
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _autograd.check_backward(ctx, "sparse_kd_loss")
        (grad,) = ctx.saved_tensors
        return _autograd.times(grad, grad_loss), None


class VocabSplit(NamedTuple):
    """This rank's slice of the vocabulary in ``group`` and the backend of the slice ops (the
    kd_slice_* or the sparse_slice_* ops): what fused_linear_kd_loss(group=) and
    fused_linear_sparse_kd_loss(group=) hand their chunk loop (lepton_fast/ops/linear_kd_loss.py)."""

    group: object
    class_offset: int
    n_classes: int
    backend: str


def vocab_split(group, n_local: int, device: torch.device, backend: str) -> VocabSplit:
    """The VocabSplit of a rank holding ``n_local`` classes (the size exchange of the module
    docstring at the group's first call)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group= needs torch.distributed initialised (init_process_group)")
    group = dist.group.WORLD if group is None else group
    return VocabSplit(group, *_slice_of(group, n_local, device, "student_weight", "rows"), backend)


def chunk_loss_and_grad(split: VocabSplit, a: kd_ops.KDArgs) -> tuple[Tensor, Tensor]:
    """(the loss of a chunk of whole rows, d(loss)/d(this rank's logits slice)) as
    fused_kd_loss's kernel gives them on one device: for fused_linear_kd_loss(group=)."""
    merged, jsd_sums = _merged_statistics(split.backend, a, split.group, split.class_offset, split.n_classes)
    return kd_ops.slice_loss_and_grad(split.backend, a, merged, jsd_sums, split.class_offset, split.n_classes)


def sparse_chunk_loss_and_grad(split: VocabSplit, student: Tensor, indices: Tensor, logprobs: Tensor,
                               mask: Optional[Tensor], o: _validate.KDOptions, truncation: str,
                               compute_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(the loss of a chunk of whole rows, d(loss)/d(this rank's logits slice)) as sparse_kd_loss's
    kernel gives them on one device: for fused_linear_sparse_kd_loss(group=)."""
    return _sparse_sharded_loss(student, indices, logprobs, mask, o, truncation, compute_grad, split,
                                "sparse_kd_loss")  # (the chunk loop names the caller's op, rows and products)


class RefusedOnAnotherRank(ValueError):
    """Another rank of the group refused its arguments at the group's first call (its own error
    says which)."""


def refuse(group, error: Exception) -> None:
    """A collective op's arguments were refused on this rank with ``error``: at ``group``'s first
    call (its slice sizes not exchanged yet, so no rank has entered a collective of the op), the
    size exchange carries the refusal, so that every rank raises (this one ``error``). Later
    calls return at once (module docstring)."""
    group = dist.group.WORLD if group is None else group
    if isinstance(error, RefusedOnAnotherRank):  # the exchange has told every rank already
        return
    if dist.is_available() and dist.is_initialized() and group not in _SLICE_SIZES:
        _slice_of(group, 0, _exchange_device(group), refused=error)


def _exchange_device(group) -> torch.device:
    """Where the size exchange's tensor lives for ``group``'s backend (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _slice_of(group, size: int, device: torch.device, name: str = "student_logits",
              what: str = "columns", refused: Optional[Exception] = None) -> tuple[int, int]:
    """(this rank's first class, the number of classes C) from the slice sizes of ``group``,
    exchanged at its first call. A rank whose arguments were ``refused`` sends -1 instead of its
    size and raises its error; every other rank then raises too, instead of waiting in the next
    collective for a rank that never joins it."""
    rank = dist.get_rank(group)
    sizes = _SLICE_SIZES.get(group)
    if sizes is None:
        mine = torch.tensor([size if refused is None else -1], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        exchanged = tuple(int(x) for x in torch.cat(gathered).tolist())
        if refused is not None:
            raise refused
        refusing = [r for r, n in enumerate(exchanged) if n < 0]
        if refusing:
            raise RefusedOnAnotherRank(f"rank {refusing[0]} of the group refused its arguments (its error says "
                                       "which), so every rank of the group stops")
        sizes = _SLICE_SIZES[group] = exchanged
    if sizes[rank] != size:
        raise ValueError(
            f"{name}: this rank's slice of the classes has {size} {what}, but it had {sizes[rank]} when "
            f"the slice sizes were exchanged for this group ({list(sizes)} in rank order); the split of the classes "
            "must stay the same for a process group (use another group for another split)"
        )
    return sum(sizes[:rank]), sum(sizes)


# --- DTensor -------------------------------------------------------------------------------------


def _is_dtensor(x) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _vocab_mesh_dim(name: str, x) -> int:
    """The mesh dimension that shards x's last dim; ValueError unless it is the only one
    not Replicate()."""
    from torch.distributed.tensor import Replicate, Shard

    placements = x.placements
    last = x.dim() - 1
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim % x.dim() == last]
    others = [p for i, p in enumerate(placements) if i not in sharded and not isinstance(p, Replicate)]
    if len(sharded) != 1 or others:
        raise ValueError(
            f"{name} must be a DTensor placed Shard(-1) on one mesh dimension and Replicate() on the others (the "
            f"classes split over ranks, every rank with all rows), got placements {tuple(placements)}; for rows "
            "split over ranks as well, call vocab_parallel_kd_loss on .to_local() tensors with group= the group "
            "that splits the classes"
        )
    return sharded[0]


def _dtensor_slice(student, group) -> tuple[Tensor, object, object, int, int]:
    """(this rank's shard of the DTensor ``student``, its mesh, the group of the mesh dimension
    that shards the classes, the shard's first class, the number of classes C); ValueError for
    placements other than vocab_parallel_kd_loss's docstring says, or a ``group`` not the mesh's."""
    mesh_dim = _vocab_mesh_dim("student_logits", student)
    mesh = student.device_mesh
    mesh_group = mesh.get_group(mesh_dim)
    if group is not None and group != mesh_group:
        raise ValueError(
            f"group must be None or the group of the mesh dimension {mesh_dim} that shards the classes (of size "
            f"{mesh.size(mesh_dim)}), got another group of size {dist.get_world_size(group)}"
        )
    # DTensor's Shard: torch.chunk's split, ceil(C / P) classes per rank while they last.
    n_classes, parts, rank = student.shape[-1], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    chunk = -(-n_classes // parts)
    class_offset = min(rank * chunk, n_classes)
    local = student.to_local()
    if local.shape[-1] != min(chunk, n_classes - class_offset):
        raise ValueError(f"student_logits: a local shard of {local.shape[-1]} classes where Shard(-1) of "
                         f"{n_classes} over {parts} ranks gives {min(chunk, n_classes - class_offset)}")
    return local, mesh, mesh_group, class_offset, n_classes


def _replicated_local(name: str, x):
    """x's local tensor when it is a DTensor (which must be replicated), else x as it is."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(x, DTensor):
        return x
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(f"{name} must be replicated, got placements {tuple(x.placements)}")
    return x.to_local()


def _dtensor_loss(student, teacher, group, temperature, kd: dict):
    from torch.distributed.tensor import DTensor, Replicate

    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, DTensor):
            raise TypeError(f"{name} must be a DTensor like the other logits, got {type(x).__name__}")
    _vocab_mesh_dim("student_logits", student)
    if teacher.device_mesh != student.device_mesh or tuple(teacher.placements) != tuple(student.placements):
        raise ValueError(
            f"teacher_logits must be placed like student_logits ({tuple(student.placements)} on its mesh), got "
            f"{tuple(teacher.placements)}" + ("" if teacher.device_mesh == student.device_mesh else " on another mesh")
        )
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher.shape)} but student_logits has shape "
                         f"{tuple(student.shape)}")
    local_s, mesh, mesh_group, class_offset, n_classes = _dtensor_slice(student, group)
    a = kd_ops.checked("vocab_parallel_kd_loss", local_s, teacher.to_local(), slice_of_classes=True,
                       temperature=temperature, **{**kd, "labels": _replicated_local("labels", kd.get("labels"))})
    loss = _sharded_loss(a, mesh_group, class_offset, n_classes)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
