"""fused_kd_loss: knowledge distillation with the gradient written during the forward.

Path of a call: :func:`fused_kd_loss` checks the arguments (lepton_fast._validate) and calls
``torch.ops.lepton_fast.fused_kd_loss`` (its schema is defined below); the dispatcher runs the
autograd kernel (csrc/autograd.cpp, or ops/_autograd.py without the extension), then the
device kernel (csrc/cpu/kd_loss.cpp, csrc/cuda/kd_loss.cu, kernels/kd_loss.py, or the
reference kernel in ops/_reference.py). ``backend=`` swaps in another kernel.

The same kernels split at a row's steps are the internal ops ``kd_slice_stats``,
``kd_slice_jsd_sums`` and ``kd_slice_loss``, for rows whose classes lie in slices on several
ranks (lepton_fast.distributed): :class:`SliceMerge` says which statistics travel between
the steps and merges them; :func:`slice_stats`, :func:`slice_jsd_sums` and
:func:`slice_loss_and_grad` run the ops on a resolved backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate

if TYPE_CHECKING:
    from typing import Unpack

# Knowledge distillation (csrc/kd_loss.h has the formulas): the loss as `reduction` asks
# (float32; float64 for float64 logits) and, when compute_grad, d(loss)/d(student_logits) in the
# student's dtype, written during the forward. "mean" divides by the rows whose label is not
# ignore_index (at least 1); num_items_in_batch, when given, divides the sum instead. ``hyper``
# is every KD schema's packed hyper-parameters (temperature, divergence, beta, alpha,
# label_smoothing, scale_by_t2: _validate.KD_FIELDS), a 1-D float64 CPU tensor.
SPEC = _backend.define(
    "fused_kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor hyper, int ignore_index, "
    "str reduction, Tensor? num_items_in_batch, bool compute_grad) -> (Tensor loss, Tensor grad)",
    triton="kd_loss", saves_grad=True)
# fused_kd_loss split at its steps (csrc/kd_loss.h), for rows whose columns lie in slices
# (lepton_fast/distributed.py: a vocabulary split over ranks). Each op reads the [N, C_r] slice
# of the rows' columns that starts at column class_offset of rows of n_classes; labels are
# class ids of the whole row. The caller merges the statistics of all slices in between
# (SliceMerge below; KDStat in csrc/kd_loss.h).
#   kd_slice_stats: each row's statistics over the slice, [N, N_STATS] (float32; float64 for
#     float64 logits); rows whose label is ignore_index get zeros.
#   kd_slice_jsd_sums: given the merged statistics, the slice's part of the JSD's sums
#     K_t = KL(p_t || m), K_s = KL(p_s || m), [N, 2] (0 at ignored rows).
#   kd_slice_loss: given the merged statistics (and merged jsd_sums for the JSD), the loss of the
#     whole rows as fused_kd_loss gives it, and the gradient of the slice (autograd as
#     fused_kd_loss's).
STATS_SPEC = _backend.define(
    "kd_slice_stats(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor hyper, int ignore_index, "
    "int class_offset, int n_classes) -> Tensor",
    triton="kd_loss", public=False)
JSD_SUMS_SPEC = _backend.define(
    "kd_slice_jsd_sums(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor stats, Tensor hyper, "
    "int ignore_index) -> Tensor",
    triton="kd_loss", public=False)
SLICE_SPEC = _backend.define(
    "kd_slice_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor stats, Tensor? jsd_sums, "
    "Tensor hyper, int ignore_index, str reduction, Tensor? num_items_in_batch, int class_offset, int n_classes, "
    "bool compute_grad) -> (Tensor loss, Tensor grad)",
    triton="kd_loss", public=False, saves_grad=True)

DIVERGENCES = _validate.DIVERGENCES
# The columns of kd_slice_stats: KDStat in csrc/kd_loss.h.
MAX_S, MAX_T, SUM_S, SUM_T, KL_SUM, SUM_CE, LIN_CE = range(7)
N_STATS = 7

Scalar = Union[float, Tensor]


def soft_kind(divergence: str, beta: float) -> str:
    """The divergence computed: the JSD at beta 0 / 1 is exactly forward / reverse KL (its
    mixture is then one of the two distributions), which every kernel runs as such."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def fake_loss_and_grad(student_logits: Tensor, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """What every KD loss op's fake kernel returns: the loss in the accumulation dtype (float32;
    float64 for float64 logits), [N] for "none", and the gradient like the student's logits, or
    an empty tensor unless compute_grad."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    loss = student_logits.new_empty((student_logits.shape[0],) if reduction == "none" else (), dtype=acc)
    grad = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty((0,))
    return loss, grad


@torch.library.register_fake("lepton_fast::fused_kd_loss")
def _(student_logits, teacher_logits, labels, hyper, ignore_index, reduction, num_items_in_batch, compute_grad):
    return fake_loss_and_grad(student_logits, reduction, compute_grad)


@torch.library.register_fake("lepton_fast::kd_slice_stats")
def _(student_logits, teacher_logits, labels, hyper, ignore_index, class_offset, n_classes):
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    return student_logits.new_empty((student_logits.shape[0], N_STATS), dtype=acc)


@torch.library.register_fake("lepton_fast::kd_slice_jsd_sums")
def _(student_logits, teacher_logits, labels, stats, hyper, ignore_index):
    return stats.new_empty((student_logits.shape[0], 2))


@torch.library.register_fake("lepton_fast::kd_slice_loss")
def _(student_logits, teacher_logits, labels, stats, jsd_sums, hyper, ignore_index, reduction, num_items_in_batch,
      class_offset, n_classes, compute_grad):
    return fake_loss_and_grad(student_logits, reduction, compute_grad)


@_validate.kd_keywords
def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: Scalar = 1.0,
    *,
    backend: Optional[str] = None,
    **kd: Unpack[_validate.KDKeywords],
) -> Tensor:
    r"""Knowledge-distillation loss in one fused pass (Hinton, Vinyals & Dean 2015).

    With :math:`p_s = \mathrm{softmax}(s / T)` and :math:`p_t = \mathrm{softmax}(t / T)`, each
    row's loss is

    .. math:: \alpha\,\mathrm{CE}(s, y) + (1 - \alpha)\, T^2\, D(p_t, p_s)

    where D is ``divergence``: ``"forward_kl"`` KL(p_t ‖ p_s) (Hinton KD), ``"reverse_kl"``
    KL(p_s ‖ p_t), or ``"jsd"``, the generalized Jensen-Shannon divergence
    β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m) with m = β·p_t + (1−β)·p_s (Agarwal et al. 2024, as in
    TRL: β = 0 is forward KL, β = 1 reverse KL). CE is at T = 1 with ``label_smoothing``.

    Args:
        student_logits: [..., C] float32, bfloat16, float16 or float64. Gradient flows here.
            May hold -inf (masked classes); a row that is entirely -inf is an error.
        teacher_logits: [..., C], same shape; a constant (detached). Of another dtype, both
            are read in the wider of the two (never rounded to the narrower), and the
            gradient comes back in the student's dtype.
        temperature: T > 0, softens both distributions; over the documented range
            1e-8 <= T <= 1e4 no kernel overflows or cancels in the softmax (every backend is
            tested against the float64 reference at both ends; how float32 loses digits of the
            loss at large T: "Precision" below). A float or a 0-d CPU tensor (as
            are beta, alpha and label_smoothing): a 0-d tensor that changes every step never
            recompiles a ``torch.compile`` graph, a Python float once.
        KD_KEYWORDS
        backend: force the kernel: ``"reference"`` (lepton_fast.reference under the op's
            schema), ``"cpu"``, ``"cuda"`` or ``"triton"`` (default: the dispatcher's, or
            ``$LEPTON_FAST_BACKEND``). Forcing is eager-only.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for ``"none"``.
        The gradient comes back in the student's dtype.

    Raises:
        TypeError: non-tensor or non-floating logits, non-integer labels, a hyper-parameter
            that is not a number.
        ValueError: shapes that differ, temperature ≤ 0 or not finite, beta/alpha/
            label_smoothing outside [0, 1], unknown divergence or reduction, labels out
            of range, alpha > 0 without labels, a row that is entirely -inf.
        RuntimeError: a forced backend that cannot run here (the message says why); a
            second backward through the same graph, a second-order gradient
            (``create_graph=True``), or torch.func's grad, vjp or jacrev (vmap works):
            differentiate :func:`lepton_fast.reference.fused_kd_loss` for those.

    Precision: the soft term is a KL of O(1/T²) multiplied back by T², so float32
    accumulation loses digits as T grows, more with more classes (relative error, measured
    against float64 on random logits: with 10 classes about 5e-6 at T = 30, 1e-4 at T = 100,
    2 % at T = 1000; with 32000 classes 1e-5, 1e-3 and 2 % on the CPU kernel, up to 13 % at
    T = 1000 on the reference kernel; the gradient stays accurate). For T ≥ 100 pass float64
    logits, which the kernels accumulate in float64. At small T every exponent and
    every KL term is an offset from its row's max, so nothing of size |x_s - x_t| / T cancels:
    float32 stays accurate to T = 1e-8 where the rows disagree: the loss to 1e-5, the
    gradient (of size 1/T) to 1e-5/T, tested against the float64 reference.

    The gradient is computed during the forward into one buffer the size of the logits;
    nothing else larger than O(N) is allocated. The backward scales it in place.
    """
    a = checked("fused_kd_loss", student_logits, teacher_logits, temperature=temperature, **kd)
    device_type = _backend.device_type(a.student)
    loss, _ = _backend.call(
        SPEC, _backend.resolve_type(SPEC, device_type, backend), device_type, a.student, a.teacher,
        a.labels, a.hyper, a.ignore_index, a.reduction, a.num_items, a.compute_grad,
    )
    return loss.reshape(a.lead) if a.reduction == "none" else loss


class KDArgs(NamedTuple):
    """The arguments of a KD loss as the ops take them, checked (:func:`checked`)."""

    student: Tensor  # [N, C], rows contiguous along C, in the wider dtype of student and teacher
    teacher: Tensor  # [N, C], detached
    labels: Optional[Tensor]  # [N] int64 or None
    lead: torch.Size  # the logits' leading dims, for a "none" loss
    hyper: Tensor  # the packed hyper-parameters (_validate.KD_FIELDS), as the schemas take them
    ignore_index: int
    reduction: str
    num_items: Optional[Tensor]
    compute_grad: bool  # the student requires a gradient and grad mode is on


def checked(op: str, student_logits, teacher_logits, *, slice_of_classes=False, **kd) -> KDArgs:
    """Every check of the arguments of ``op`` (fused_kd_loss, or a function with its contract;
    the label range aside: the kernels check it where they read the labels), and the
    arguments as the ops take them; ``kd`` are the KD keywords (_validate.kd_options). A slice
    of the classes (``slice_of_classes``) may be empty."""
    _validate.logits("student_logits", student_logits, empty_ok=slice_of_classes)
    _validate.logits("teacher_logits", teacher_logits, empty_ok=slice_of_classes)
    _validate.same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    o = _validate.kd_options(op, "student_logits", student_logits, **kd)
    student, teacher = _validate.common_dtype(student_logits, _validate.constant(teacher_logits))
    student, teacher = _validate.as_rows(student), _validate.as_rows(teacher)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    return KDArgs(student, teacher, o.labels, student_logits.shape[:-1], o.hyper, o.ignore_index, o.reduction,
                  o.num_items, compute_grad)


# --- The slice ops ---------------------------------------------------------------------------


class SliceMerge:
    """Which of kd_slice_stats' columns (MAX_S, ...) the slices of a row must
    merge for a loss, and the merge (KDStat in csrc/kd_loss.h): the maxima by their max; each
    sum against the merged max (``rescaled``), then summed; the CE's linear part summed.

    Forward and reverse KL need the two maxima, then the two sums and the KL sum A (re-centred
    on both merged maxima, recentred_kl_sum in csrc/kd_loss.h); the JSD the maxima and the
    sums, and afterwards its own two sums (kd_slice_jsd_sums); the CE (alpha > 0) adds its
    linear part and, at T != 1 (or without the soft term), its sum.
    """

    def __init__(self, hyper: Tensor):
        h = _validate.kd_values(hyper)
        temperature, kind = h["temperature"], soft_kind(h["divergence"], h["beta"])
        soft, ce = h["alpha"] < 1, h["alpha"] > 0
        self.temperature = temperature
        self.jsd = soft and kind == "jsd"
        self.max_cols = [MAX_S, MAX_T] if soft else [MAX_S]
        # (column, the column of the max it is taken against, or None for a plain sum)
        sums = []
        if soft:
            sums += [(SUM_S, MAX_S), (SUM_T, MAX_T)]
            if kind != "jsd":
                sums.append((KL_SUM, MAX_T if kind == "forward_kl" else MAX_S))
        self.ce_is_soft = soft and ce and temperature == 1.0  # the CE's sum is the student's
        if ce:
            if not self.ce_is_soft:
                sums.append((SUM_CE, MAX_S))
            sums.append((LIN_CE, None))
        self.sum_cols = [c for c, _ in sums]
        self._against = [m for _, m in sums]

    def maxima(self, stats: Tensor) -> Tensor:
        """[N, len(max_cols)], contiguous: what the maxima's merge reduces with MAX."""
        return stats[:, self.max_cols].contiguous()

    def rescaled(self, stats: Tensor, merged_max: Tensor) -> Tensor:
        """[N, len(sum_cols)], contiguous: this slice's sums against the merged maxima
        (``maxima`` reduced by MAX), what the sums' merge reduces with SUM."""
        local = stats[:, self.max_cols]
        some = local != float("-inf")  # a slice with no finite entry adds 0
        delta = torch.where(some, local - merged_max, 0.0)  # of the raw logits: the sums' exponents are delta / T
        factor = torch.where(some, (delta / self.temperature).exp(), 0.0)
        ce_factor = torch.where(some[:, 0], delta[:, 0].exp(), 0.0)
        columns = []
        for col, against in zip(self.sum_cols, self._against):
            x = stats[:, col]
            if col == KL_SUM:
                # p's sum S_p and the rise of each max: A' = r_p (A + S_p (rise_q - rise_p) / T)
                p = self.max_cols.index(against)
                s_p = stats[:, SUM_T if against == MAX_T else SUM_S]
                shift = (delta[:, p] - delta[:, 1 - p]) / self.temperature
                x = x + torch.where(s_p == 0, 0.0, s_p * shift)
                x = torch.where(factor[:, p] == 0, 0.0, x * factor[:, p])  # 0 * inf = 0, as merged
            elif against is not None:
                x = x * (ce_factor if col == SUM_CE else factor[:, self.max_cols.index(against)])
            columns.append(x)
        return torch.stack(columns, 1)

    def merged(self, merged_max: Tensor, merged_sums: Tensor) -> Tensor:
        """The [N, 7] merged statistics kd_slice_jsd_sums and kd_slice_loss take."""
        out = merged_max.new_zeros(merged_max.shape[0], N_STATS)
        out[:, self.max_cols] = merged_max
        out[:, self.sum_cols] = merged_sums
        if self.ce_is_soft:
            out[:, SUM_CE] = out[:, SUM_S]
        return out


def slice_backend(device: torch.device) -> str:
    """The backend the slice ops run on for tensors on ``device`` ($LEPTON_FAST_BACKEND or the
    dispatcher's kernel)."""
    return _backend.resolve(SLICE_SPEC, device)


def slice_stats(backend: str, a: KDArgs, class_offset: int, n_classes: int) -> Tensor:
    """kd_slice_stats of the slice a.student (columns class_offset... of n_classes)."""
    student = a.student.detach()
    return _backend.call(STATS_SPEC, backend, student.device.type, student, a.teacher, a.labels, a.hyper,
                         a.ignore_index, class_offset, n_classes)


def slice_jsd_sums(backend: str, a: KDArgs, stats: Tensor) -> Tensor:
    """kd_slice_jsd_sums of the slice a.student, given the merged statistics."""
    student = a.student.detach()
    return _backend.call(JSD_SUMS_SPEC, backend, student.device.type, student, a.teacher, a.labels, stats, a.hyper,
                         a.ignore_index)


def slice_loss_and_grad(backend: str, a: KDArgs, stats: Tensor, jsd_sums: Optional[Tensor], class_offset: int,
                        n_classes: int) -> tuple[Tensor, Tensor]:
    """kd_slice_loss: (the loss of the whole rows from their merged statistics, differentiable
    with respect to a.student (the slice) through the op's autograd kernel; d(loss)/d(a.student)
    as the op wrote it, or an empty tensor unless a.compute_grad)."""
    return _backend.call(SLICE_SPEC, backend, a.student.device.type, a.student, a.teacher, a.labels, stats,
                         jsd_sums, a.hyper, a.ignore_index, a.reduction, a.num_items, class_offset, n_classes,
                         a.compute_grad)


def slice_loss(backend: str, a: KDArgs, stats: Tensor, jsd_sums: Optional[Tensor], class_offset: int,
               n_classes: int) -> Tensor:
    """The loss of :func:`slice_loss_and_grad`, differentiable with respect to a.student."""
    return slice_loss_and_grad(backend, a, stats, jsd_sums, class_offset, n_classes)[0]
