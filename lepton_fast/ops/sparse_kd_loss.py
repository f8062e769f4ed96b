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
    is not stored.

    Entries that count: those whose mask is True, in rows whose label is not
    ``ignore_index``, and of several with the same index only the first (a repeated index
    never counts twice). A row with no entry that counts has soft term 0 and no soft
    gradient (under "tail" both tails are then 1: the same 0); it still counts in "mean".
    Masked entries are not read: their index and value may be anything (padding, NaN).
    With K = 1 "renormalize" gives 0 (both sides are the one class).

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Gradient flows here.
            May hold -inf; a row with no finite logit is an error.
        teacher_indices: [..., K] integer class ids in [0, V) (K ≥ 1).
        teacher_logprobs: [..., K] floating log-probabilities at T = 1 (-inf allowed: a class
            with probability 0); a constant. Read in their own dtype, accumulated in float32
            (float64 for float64 student logits).
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
