"""sparse_kd_loss: knowledge distillation from a teacher stored as its top-k log-probabilities.

Path of a call: :func:`sparse_kd_loss` checks the arguments (lepton_fast._validate, and the KD
hyper-parameters as fused_kd_loss checks them) and calls ``torch.ops.lepton_fast.sparse_kd_loss``
(its schema is defined below); the dispatcher runs the autograd kernel (csrc/autograd.cpp, or
ops/_autograd.py without the extension), then
the device kernel: the CPU C++ kernel (csrc/cpu/sparse_kd_loss.cpp; the reference kernel in
ops/_reference.py over lepton_fast.reference without the extension) on CPU tensors, the CUDA
C++ kernel (csrc/cuda/sparse_kd_loss.cu; Triton, kernels/sparse_kd_loss.py, without a CUDA
build of the extension) on CUDA tensors. The C++ kernels share their per-row maths
(csrc/sparse_kd_loss.h). ``backend=`` swaps in another kernel (``"triton"`` on CPU tensors
under TRITON_INTERPRET=1).

The same row kernel split at its pass are the internal ops ``sparse_slice_stats`` and
``sparse_slice_grad``, the per-rank work of lepton_fast.distributed.vocab_parallel_sparse_kd_loss:
:class:`SliceMerge` merges their statistics across ranks; :func:`slice_stats` and
:func:`slice_grad` run them on a resolved backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lepton_fast import _backend, _validate
from lepton_fast.ops import kd_loss

if TYPE_CHECKING:
    from typing import Unpack

# The loss as `reduction` asks (float32; float64 for float64 logits) and, when compute_grad,
# d(loss)/d(student_logits) in the student's dtype, written during the forward. Rows: student
# logits [N, V] and teacher entries [N, K] (indices int64, log-probabilities of any floating
# dtype, mask bool or None), each contiguous along its last dim. The kernels check the indices
# they read (unmasked entries of rows not ignored) against [0, V). ``hyper``: the packed KD
# hyper-parameters, as fused_kd_loss's schema takes them (_validate.KD_FIELDS); the truncation,
# which only this family has, is an argument of its own.
SPEC = _backend.define(
    "sparse_kd_loss(Tensor student_logits, Tensor teacher_indices, Tensor teacher_logprobs, Tensor? teacher_mask, "
    "Tensor? labels, Tensor hyper, str truncation, int ignore_index, str reduction, Tensor? num_items_in_batch, "
    "bool compute_grad) -> (Tensor loss, Tensor grad)",
    triton="sparse_kd_loss", saves_grad=True)

TRUNCATIONS = ("renormalize", "tail")

# sparse_kd_loss split at its two passes over a row, for a rank that holds the [N, C_r] slice of
# the student's classes starting at class_offset of rows of n_classes
# (lepton_fast.distributed.vocab_parallel_sparse_kd_loss). ``column`` [N, K] int64 is each
# counted entry's column in the slice, -1 for an entry that does not count or lies in another
# slice; the columns >= 0 of a row must be distinct (reference.sparse_slice_columns gives them).
# Both ops skip the rows whose label is ignore_index. One pass over the slice each: CPU C++ kernels
# (csrc/cpu/sparse_kd_loss.cpp) and Triton kernels (kernels/sparse_kd_loss.py, those of CUDA
# tensors: there is no CUDA C++ kernel of these two).
#   sparse_slice_stats: the slice's statistics against its OWN maxima, [N, SP_ENTRIES + K] in the
#     accumulation dtype (columns below); the columns that the terms (alpha, truncation) do not
#     need are -inf (maxima) or 0, as are an ignored row's. SliceMerge merges them across slices.
#   sparse_slice_grad: d(loss)/d(the slice) in the student's dtype, from each row's coefficients
#     [N, GR_ENTRIES + K] in the accumulation dtype (columns below; reference.sparse_slice_rows
#     gives them): per class x of the slice, GR_CONST + GR_SOFTMAX exp((x - GR_MAX) / T)
#     + GR_UNLISTED [x not listed] exp((x - GR_MAX_UNLISTED) / T) + GR_SOFTMAX_CE exp(x - GR_MAX),
#     plus GR_LABEL at the label's column and GR_ENTRIES + k at entry k's column; a term whose
#     coefficient is 0 adds 0, and an ignored row is 0.
SLICE_STATS_SPEC = _backend.define(
    "sparse_slice_stats(Tensor student_logits, Tensor column, Tensor? labels, Tensor hyper, str truncation, "
    "int ignore_index, int class_offset, int n_classes) -> Tensor",
    triton="sparse_kd_loss", public=False, cuda_cpp=False)
SLICE_GRAD_SPEC = _backend.define(
    "sparse_slice_grad(Tensor student_logits, Tensor column, Tensor? labels, Tensor coefficients, Tensor hyper, "
    "int ignore_index, int class_offset) -> Tensor",
    triton="sparse_kd_loss", public=False, cuda_cpp=False)
# The columns of sparse_slice_stats (SparseStat in csrc/sparse_kd_loss.h): the slice's max of the
# raw logits and its max over the classes no counted entry lists ("tail"); against them, the sums
# of exp((x - max) / T) over all classes and over the unlisted ones ("tail"), the CE's sum of
# exp(x - max) and its linear part (1 - eps) x[label] + eps / n_classes sum x (alpha > 0); then
# the student's logits at the K entries (0 where column is -1; the soft term).
SP_MAX, SP_MAX_UNLISTED, SP_SUM, SP_SUM_UNLISTED, SP_SUM_CE, SP_LIN_CE, SP_ENTRIES = range(7)
# The columns of sparse_slice_grad's coefficients (SparseGradCoef in csrc/sparse_kd_loss.h).
GR_MAX, GR_MAX_UNLISTED, GR_CONST, GR_SOFTMAX, GR_UNLISTED, GR_SOFTMAX_CE, GR_LABEL, GR_ENTRIES = range(8)


@torch.library.register_fake("lepton_fast::sparse_slice_stats")
def _(student_logits, column, labels, hyper, truncation, ignore_index, class_offset, n_classes):
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    return student_logits.new_empty((student_logits.shape[0], SP_ENTRIES + column.shape[1]), dtype=acc)


@torch.library.register_fake("lepton_fast::sparse_slice_grad")
def _(student_logits, column, labels, coefficients, hyper, ignore_index, class_offset):
    return torch.empty_like(student_logits)


class SliceMerge:
    """Which of sparse_slice_stats' columns the slices of a row merge for a loss, and the merge:
    the maxima by their max, each sum rescaled from its slice's max to the merged one and summed
    (as ops.kd_loss.SliceMerge merges the dense statistics), the linear part and the entries'
    logits summed (each entry's logit comes from the one slice that holds it).

    The maxima: the row's for "tail" or the CE, the unlisted classes' for "tail". The sums:
    "tail"'s two at T, the CE's at 1 and its linear part, the soft term's K logits; so
    "renormalize" without the CE merges only the logits."""

    def __init__(self, hyper: Tensor, truncation: str):
        h = _validate.kd_values(hyper)
        soft, ce = h["alpha"] < 1, h["alpha"] > 0
        tail = soft and truncation == "tail"
        self.temperature = h["temperature"]
        self.max_cols = ([SP_MAX] if tail or ce else []) + ([SP_MAX_UNLISTED] if tail else [])
        # (column, the column of the max it is against and its temperature, or None for a plain sum)
        sums = ([(SP_SUM, (SP_MAX, self.temperature)), (SP_SUM_UNLISTED, (SP_MAX_UNLISTED, self.temperature))]
                if tail else [])
        sums += [(SP_SUM_CE, (SP_MAX, 1.0)), (SP_LIN_CE, None)] if ce else []
        self._sums = sums
        self.soft = soft

    def sum_cols(self, k: int) -> list[int]:
        return [c for c, _ in self._sums] + (list(range(SP_ENTRIES, SP_ENTRIES + k)) if self.soft else [])

    def maxima(self, stats: Tensor) -> Tensor:
        """[N, len(max_cols)], contiguous: what the maxima's merge reduces with MAX."""
        return stats[:, self.max_cols].contiguous()

    def rescaled(self, stats: Tensor, merged_max: Tensor) -> Tensor:
        """[N, len(sum_cols)], contiguous: this slice's sums against the merged maxima
        (``maxima`` reduced by MAX), what the sums' merge reduces with SUM."""
        columns = []
        for col, against in self._sums:
            x = stats[:, col]
            if against is not None:
                max_col, temperature = against
                local, merged = stats[:, max_col], merged_max[:, self.max_cols.index(max_col)]
                some = local != float("-inf")  # a slice with no finite entry adds 0
                # of the raw logits, the difference before the division, as in scaled_logits
                x = torch.where(some, x * ((torch.where(some, local, 0.0) - merged) / temperature).exp(), 0.0)
            columns.append(x)
        if self.soft:
            columns.append(stats[:, SP_ENTRIES:])
        return torch.cat([c if c.dim() == 2 else c[:, None] for c in columns], 1)

    def merged(self, stats: Tensor, merged_max: Tensor, merged_sums: Tensor) -> Tensor:
        """``stats`` with the merged maxima and sums in their columns (in place), the rows'
        statistics over the whole vocabulary that reference.sparse_slice_rows takes."""
        stats[:, self.max_cols] = merged_max
        stats[:, self.sum_cols(stats.shape[1] - SP_ENTRIES)] = merged_sums
        return stats


@torch.library.register_fake("lepton_fast::sparse_kd_loss")
def _(student_logits, teacher_indices, teacher_logprobs, teacher_mask, labels, hyper, truncation, ignore_index,
      reduction, num_items_in_batch, compute_grad):
    return kd_loss.fake_loss_and_grad(student_logits, reduction, compute_grad)


@_validate.kd_keywords
def sparse_kd_loss(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_mask: Optional[Tensor] = None,
    temperature: kd_loss.Scalar = 1.0,
    *,
    truncation: str = "renormalize",
    backend: Optional[str] = None,
    **kd: Unpack[_validate.KDKeywords],
) -> Tensor:
    r"""Knowledge distillation from a teacher given only at K entries per row: its top-k
    log-probabilities as a teacher model or vLLM writes them once, for many student runs.

    Each row's loss is :math:`\alpha\,\mathrm{CE}(s, y) + (1-\alpha)\,T^2\,D(P, Q)`, as in
    :func:`lepton_fast.fused_kd_loss`, where D is ``divergence`` between the teacher's
    buckets P and the student's buckets Q. With lp the stored log-probabilities of the
    entries that count (below) and z = student_logits / T:

    - ``truncation="renormalize"``: one bucket per entry; P = softmax(lp / T) and
      Q = softmax(z[indices]), both over the entries. The student's other classes get no
      gradient. (axolotl's ``normalize_topk=True``.)
    - ``truncation="tail"``: one bucket per entry plus one for every class not listed. The
      teacher's listed mass is L = min(1, Σ exp(lp)), spread over the entries as
      L · softmax(lp / T); its tail is 1 − L (1 − Σ exp(lp) clamped at 0). The student's
      buckets are softmax(z) at the entries and its exact mass outside them, from the
      log-sum-exp of the classes not listed. At T = 1 the teacher's entries are exp(lp) as
      given (when they sum to at most 1). When the entries list every class, L is 1 (what
      is left is rounding). With stored logprobs that sum to 1 this is axolotl's
      ``normalize_topk=False``.

    Temperature: the stored log-probabilities are those of the teacher's full distribution
    at T = 1; at T ≠ 1 they are re-tempered as lp / T renormalised over the entries (p^{1/T}
    up to a constant, which is what tempering the teacher's logits does to the listed
    classes); the tail keeps its mass 1 − L, since how it spreads over the unlisted classes
    is not stored. So under "tail" the tail bucket does not soften with T while the
    student's does: with ``scale_by_t2`` the loss grows as T² at large T, by construction.

    Precision: as :func:`lepton_fast.fused_kd_loss`'s ("Precision" there): at large T a
    float32 loss loses digits (measured under "renormalize" at 32000 classes: 2e-4 relative
    at T = 1000, 36 % at T = 1e4); pass float64 logits there.

    Entries that count: those whose mask is True, in rows whose label is not
    ``ignore_index``, and of several with the same index only the first (a repeated index
    never counts twice). A row with no entry that counts has soft term 0 and no soft
    gradient (under "tail" both tails are then 1: the same 0); it still counts in "mean".
    Masked entries are not read: their index and value may be anything (padding, NaN).
    With K = 1 "renormalize" gives 0 (both sides are the one class). These zeros are exact for
    the KLs; "jsd" leaves the rounding of its mixture's log, up to about 6e-8 a row times T²,
    of either sign.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Gradient flows here.
            May hold -inf; a row with no finite logit is an error.
        teacher_indices: [..., K] integer class ids in [0, V) (K ≥ 1).
        teacher_logprobs: [..., K] floating log-probabilities at T = 1 (-inf allowed: a class
            with probability 0); a constant. Read in their own dtype, accumulated in float32
            (float64 for float64 student logits). They must be log-probabilities (<= 0, as
            ``log_softmax`` gives them): probabilities give a wrong loss without an error, and
            so do raw or shifted logits under ``"tail"`` (``"renormalize"`` reads only their
            differences); the values are not checked.
        teacher_mask: optional [..., K] bool (or 0/1 integer): False = entry not provided.
        temperature, backend: as :func:`lepton_fast.fused_kd_loss`.
        KD_KEYWORDS
        truncation: ``"renormalize"`` or ``"tail"``.

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or [...] for ``"none"``.

    Raises:
        TypeError: non-tensor arguments, non-floating logits or logprobs, non-integer indices
            or labels, a mask that is neither bool nor integer.
        ValueError: shapes or devices that do not match, K = 0, a hyper-parameter out of
            range, unknown divergence/truncation/reduction, an index that counts outside
            [0, V) (named ``teacher_indices``), labels out of range, a row whose buckets are
            undefined (no finite student logit; under "renormalize", every entry's teacher
            or student value -inf; a NaN or +inf read).
        RuntimeError: a forced backend that cannot run here; a second-order gradient
            (differentiate :func:`lepton_fast.reference.sparse_kd_loss` for those); the CUDA
            C++ kernel with more than 327680 classes (``backend="triton"`` takes any V).

    Sources: axolotl's top-k KD (``integrations/kd/topk_logprob``), MaxText's
    ``kl_divergence_between_logits(truncation_strategy="renormalize" | "other_bucket")``.
    """
    _validate.logits("student_logits", student_logits)
    indices, logprobs, mask = _validate.sparse_teacher(teacher_indices, teacher_logprobs, teacher_mask,
                                                       "student_logits", student_logits)
    _validate.choice("truncation", truncation, TRUNCATIONS)
    o = _validate.kd_options("sparse_kd_loss", "student_logits", student_logits, temperature=temperature, **kd)
    student = _validate.as_rows(student_logits)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _ = _backend.call(
        SPEC, _backend.resolve(SPEC, student.device, backend), student.device.type, student, indices, logprobs, mask,
        o.labels, o.hyper, truncation, o.ignore_index, o.reduction, o.num_items, compute_grad,
    )
    return loss.reshape(student_logits.shape[:-1]) if o.reduction == "none" else loss


def slice_backend(device: torch.device) -> str:
    """The backend the slice ops run on for tensors on ``device`` ($LEPTON_FAST_BACKEND or the
    dispatcher's kernel: the CPU C++ kernels, Triton on CUDA tensors; the reference kernels
    where neither is installed)."""
    return _backend.resolve(SLICE_GRAD_SPEC, device)


def slice_stats(backend: str, student: Tensor, column: Tensor, labels: Optional[Tensor], hyper: Tensor,
                truncation: str, ignore_index: int, class_offset: int, n_classes: int) -> Tensor:
    """sparse_slice_stats of the [N, C_r] slice ``student`` (columns class_offset... of n_classes)."""
    student = student.detach()
    return _backend.call(SLICE_STATS_SPEC, backend, student.device.type, student, column, labels, hyper, truncation,
                         ignore_index, class_offset, n_classes)


def slice_grad(backend: str, student: Tensor, column: Tensor, labels: Optional[Tensor], coefficients: Tensor,
               hyper: Tensor, ignore_index: int, class_offset: int) -> Tensor:
    """sparse_slice_grad: d(loss)/d(the slice ``student``) from the rows' gradient coefficients."""
    student = student.detach()
    return _backend.call(SLICE_GRAD_SPEC, backend, student.device.type, student, column, labels, coefficients,
                         hyper, ignore_index, class_offset)
