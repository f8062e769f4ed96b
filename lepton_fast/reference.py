"""Pure-PyTorch definitions of every lepton_fast op.

This module is the single source of truth for the math. It is the oracle of the tests (run
in float64), the math of the reference kernels (lepton_fast/ops/_reference.py adapts it to
the op schemas: the CPU kernels without the extension) and the baseline of the
benchmarks (eager and under torch.compile). It computes in float32 at least, whatever the
input dtype, as the kernels do; autograd gives its gradients. Its sparse_slice_rows is also the
small [N, K + 4] step of lepton_fast.distributed.vocab_parallel_sparse_kd_loss between its two
kernels (the derivatives of the rows' loss with respect to their merged statistics).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lepton_fast import _validate
from lepton_fast.ops.kd_loss import KL_SUM, LIN_CE, MAX_S, MAX_T, N_STATS, SUM_CE, SUM_S, SUM_T, soft_kind
from lepton_fast.ops.sparse_kd_loss import (GR_CONST, GR_ENTRIES, GR_LABEL, GR_MAX, GR_MAX_UNLISTED, GR_SOFTMAX,
                                           GR_SOFTMAX_CE, GR_UNLISTED, SP_ENTRIES, SP_LIN_CE, SP_MAX,
                                           SP_MAX_UNLISTED, SP_SUM, SP_SUM_CE, SP_SUM_UNLISTED)

NEG_INF = float("-inf")


def _acc(x: Tensor) -> Tensor:
    """x in the accumulation dtype: float32, or float64 when x is float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def scaled_logits(x: Tensor, temperature) -> Tensor:
    """(x - max x) / T along the last dim: the exponent of softmax(x / T), shifted by the row's
    max before the division. Dividing first would round x / T at every element, and at a small
    T (z = x / T ~ 1e8 at T = 1e-8: a float32 ulp of 8) the shift would then subtract rounded
    values; a difference of the raw logits is exact at the max and accurate elsewhere, for every
    T in the documented range 1e-8 ... 1e4. The max is a constant of the softmax (no gradient
    goes through it); an entirely -inf row stays NaN, as its softmax is undefined.
    """
    top = x.detach().amax(-1, keepdim=True) if x.shape[-1] else x.new_zeros(x.shape[:-1] + (1,))
    return (x - top) / temperature


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) along the last dim with 0 * log 0 = 0.

    A class whose p is 0 in the accumulation dtype adds nothing, whatever q: a -inf logit,
    or a finite one so low that exp underflows (a padded class masked with finfo.min on one
    side and -inf on the other, whose 0 * inf would be NaN). Where p > 0 and q = 0 the term
    is +inf, the true value. The inner ``where`` keeps the masked branch finite so that
    autograd sends no NaN through it.
    """
    present = logp.exp() != 0  # NaN (a row with no finite logit) stays, and shows
    logp_safe = torch.where(present, logp, 0.0)
    terms = torch.where(present, logp_safe.exp() * (logp_safe - logq), 0.0)
    return terms.sum(-1)


def _log_mixture(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """log(beta * p_t + (1 - beta) * p_s), computed in log space, -inf where both are 0."""
    both = torch.stack([logp_s + math.log1p(-beta), logp_t + math.log(beta)])
    present = (both > NEG_INF).any(0)
    safe = torch.where(present, both, 0.0)
    return torch.where(present, torch.logsumexp(safe, 0), NEG_INF)


def soft_divergence_rows(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, divergence: str, beta: float
) -> Tensor:
    """Per-row divergence between softmax(student / T) and softmax(teacher / T), [N].

    forward_kl = KL(p_t || p_s) (Hinton et al. 2015); reverse_kl = KL(p_s || p_t);
    jsd = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s,
    with beta = 0 giving forward KL and beta = 1 reverse KL (TRL's generalized JSD, Agarwal
    et al. 2024).
    """
    logp_s = torch.log_softmax(scaled_logits(_acc(student_logits), temperature), dim=-1)
    logp_t = torch.log_softmax(scaled_logits(_acc(teacher_logits), temperature), dim=-1)
    return divergence_rows(logp_t, logp_s, divergence, beta)


def divergence_rows(logp_t: Tensor, logp_s: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row divergence between two distributions given as log-probabilities along the last
    dim (-inf for probability 0), [N]: the divergences of :func:`soft_divergence_rows`."""
    kind = soft_kind(divergence, beta)
    if kind == "jsd":
        log_m = _log_mixture(logp_s, logp_t, beta)
        return beta * _kl_rows(logp_t, log_m) + (1.0 - beta) * _kl_rows(logp_s, log_m)
    if kind == "forward_kl":
        return _kl_rows(logp_t, logp_s)
    if kind == "reverse_kl":
        return _kl_rows(logp_s, logp_t)
    raise ValueError(f"divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got {divergence!r}")


def _kd_loss(op: str, student_logits: Tensor, temperature, kd: dict, soft) -> Tensor:
    """The loss of every KD op around its soft term, reduced as ``kd["reduction"]`` says: per row
    alpha * CE(student, label) + (1 - alpha) * T^2 * soft, CE at T = 1 with ``label_smoothing``
    (Hinton et al. 2015); rows whose label is ``ignore_index`` are 0 and get no gradient. A term
    whose weight is 0 is not computed, so its infinities cannot leak in as 0 * inf.

    ``kd`` are the KD keywords given to ``op`` (lepton_fast._validate.KD_DEFAULTS for the others);
    ``soft(student, valid, kd)`` gives the soft term [N] of the [N, C] student rows (ignored rows
    zeroed), ``valid`` the rows not ignored ([N] bool, or None without labels), ``kd`` filled in
    (its labels flattened to [N]).
    """
    kd = _validate.kd_filled(op, {**kd, "temperature": temperature})
    lead, n_classes = student_logits.shape[:-1], student_logits.shape[-1]
    # int64: F.cross_entropy takes no other integer labels, the ops take any
    labels = kd["labels"] = None if kd["labels"] is None else kd["labels"].reshape(-1).long()
    student = student_logits.reshape(-1, n_classes)
    rows = student.new_zeros(student.shape[0], dtype=_acc(student).dtype)
    valid = None
    if labels is not None:
        valid = labels != kd["ignore_index"]
        # Ignored rows may hold anything (even all -inf): zero them so no NaN can reach autograd.
        student = torch.where(valid[:, None], student, 0.0)
    alpha = kd["alpha"]
    if alpha < 1.0:
        rows = rows + (1.0 - alpha) * (temperature**2 if kd["scale_by_t2"] else 1.0) * soft(student, valid, kd)
    if alpha > 0.0:
        ce = torch.nn.functional.cross_entropy(_acc(student), labels, ignore_index=kd["ignore_index"],
                                               label_smoothing=kd["label_smoothing"], reduction="none")
        rows = rows + alpha * ce
    if valid is not None:
        rows = torch.where(valid, rows, 0.0)
    divisor = mean_divisor(labels, kd["ignore_index"], rows.shape[0])
    loss = reduce_rows(rows, kd["reduction"], divisor, kd["num_items_in_batch"])
    return loss.reshape(lead if kd["reduction"] == "none" else ())


def mean_divisor(labels: Tensor | None, ignore_index: int, n_rows: int):
    """How many rows a "mean" averages over: the non-ignored ones (a tensor, no host sync),
    at least 1, so that a batch with every row ignored has loss 0, not NaN."""
    if labels is None:
        return max(n_rows, 1)
    return (labels != ignore_index).sum().clamp(min=1)


def reduction_divisor(reduction: str, divisor, num_items_in_batch=None):
    """What :func:`reduce_rows` divides the rows' sum by, and so what each row's gradient is
    divided by: num_items_in_batch when given, the mean's ``divisor`` for "mean"/"batchmean",
    else 1 ("sum"; "none", whose rows are not summed)."""
    if reduction == "none":
        return 1
    if num_items_in_batch is not None:
        return num_items_in_batch
    return divisor if reduction in ("mean", "batchmean") else 1


def reduce_rows(rows: Tensor, reduction: str, divisor, num_items_in_batch=None) -> Tensor:
    """"mean"/"batchmean": sum / divisor; "sum"; "none": rows unchanged. num_items_in_batch,
    when given, divides the sum instead (transformers' and TRL's gradient accumulation)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if num_items_in_batch is not None:
        return (total / num_items_in_batch).to(total.dtype)
    return total if reduction == "sum" else total / divisor


@_validate.kd_keywords
def fused_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, **kd) -> Tensor:
    """Reference of :func:`lepton_fast.fused_kd_loss` on [..., C] logits (no argument checks):
    the divergences of :func:`soft_divergence_rows` in :func:`_kd_loss`.

    Args:
        KD_KEYWORDS
    """
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])

    def soft(student: Tensor, valid: Tensor | None, kd: dict) -> Tensor:
        t = teacher if valid is None else torch.where(valid[:, None], teacher, 0.0)
        return soft_divergence_rows(student, t, kd["temperature"], kd["divergence"], kd["beta"])

    return _kd_loss("fused_kd_loss", student_logits, temperature, kd, soft)


# --- Knowledge distillation from a sparse teacher (stored top-k log-probabilities) ---------


def _lse_or_neg_inf(x: Tensor) -> Tensor:
    """logsumexp along the last dim, -inf for a row whose entries are all -inf, with a finite
    gradient in that case too (autograd's logsumexp gives NaN there); NaN for a row with a NaN."""
    some = (x != NEG_INF).any(-1)  # not `x > NEG_INF`, which a NaN fails: the row would pass as empty
    return torch.where(some, torch.logsumexp(torch.where(some[..., None], x, 0.0), -1), NEG_INF)


def _log_softmax_over(x: Tensor, valid: Tensor) -> Tensor:
    """log softmax of x over the entries where ``valid`` along the last dim, -inf elsewhere
    (everywhere in a row with none); NaN where every valid entry of a row is -inf."""
    lse = _lse_or_neg_inf(torch.where(valid, x, NEG_INF))
    some = valid.any(-1, keepdim=True)
    return torch.where(valid, x - torch.where(some, lse[..., None], 0.0), NEG_INF)


def sparse_teacher_entries(teacher_indices: Tensor, teacher_mask: Tensor | None, labels: Tensor | None = None,
                           ignore_index: int = -100) -> Tensor:
    """Which teacher entries of [N, K] a kernel reads, [N, K] bool: those not masked out, in
    rows whose label is not ``ignore_index``. Their indices must lie in [0, V)."""
    read = torch.ones_like(teacher_indices, dtype=torch.bool) if teacher_mask is None else teacher_mask.bool()
    return read if labels is None else read & (labels != ignore_index)[:, None]


def sparse_counted_entries(teacher_indices: Tensor, read: Tensor) -> Tensor:
    """The entries that count, [N, K] bool: each read entry whose index no earlier read entry
    of its row holds (a duplicate index counts once, at its first read occurrence).

    By a stable sort of each row's read indices (the entries not read as -1, below every class
    id): the first of each run of equal indices counts. O(N K log K), where comparing every
    pair of entries took an [N, K, K] tensor (64 MiB of booleans at N = 4096, K = 64)."""
    key = torch.where(read, teacher_indices, -1)
    ordered, entry = key.sort(dim=-1, stable=True)
    first = torch.ones_like(read)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return torch.empty_like(read).scatter_(1, entry, first & (ordered >= 0))


def sparse_buckets(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, counted: Tensor, *,
                   temperature: float, truncation: str) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probabilities of each row's buckets, [N, K] ("renormalize") or
    [N, K + 1] ("tail", the last bucket being the mass outside the counted entries); -inf at
    the entries that do not count. ``counted`` as :func:`sparse_counted_entries` gives it.

    With lp the stored teacher log-probabilities (at T = 1) and z = student_logits / T:
      renormalize: teacher softmax(lp / T) and student softmax(z[index]), both over the
        counted entries;
      tail: the teacher's listed mass L = min(1, sum exp(lp)) (1 when the counted entries
        cover every class: what is left is rounding), spread over the entries as
        L * softmax(lp / T), and its tail 1 - L; the student's softmax(z) at the entries and
        its exact mass outside them, from the log-sum-exp of the classes not listed.
    At T = 1 and sum exp(lp) <= 1 the tail's teacher is exp(lp) as given. Each softmax at T
    is of :func:`scaled_logits` (the max subtracted before the division), of the counted
    entries where it is over them. The two sides are :func:`sparse_teacher_buckets` and
    :func:`sparse_student_buckets`.
    """
    x = _acc(student_logits)
    log_t = sparse_teacher_buckets(teacher_logprobs, counted, x.shape[-1], temperature=temperature,
                                   truncation=truncation, dtype=x.dtype)
    x_at = x.gather(1, torch.where(counted, teacher_indices, 0))
    if truncation == "renormalize":
        return log_t, sparse_student_buckets(x_at, counted, temperature=temperature, truncation=truncation)
    z = scaled_logits(x, temperature)
    listed = torch.zeros_like(z, dtype=torch.int32).scatter_add_(1, torch.where(counted, teacher_indices, 0),
                                                                 counted.int()) > 0
    lse = torch.logsumexp(z, -1)
    lse_unlisted = _lse_or_neg_inf(torch.where(listed, NEG_INF, z))
    return log_t, sparse_student_buckets(x_at, counted, temperature=temperature, truncation=truncation,
                                         row_max=x.detach().amax(-1), lse=lse, lse_unlisted=lse_unlisted)


def sparse_teacher_buckets(teacher_logprobs: Tensor, counted: Tensor, n_classes: int, *, temperature: float,
                           truncation: str, dtype: torch.dtype) -> Tensor:
    """The teacher's side of :func:`sparse_buckets` from its stored log-probabilities [N, K],
    computed in ``dtype`` (the student's accumulation dtype), for rows of ``n_classes``."""
    lp = teacher_logprobs.detach().to(dtype)
    log_t = _log_softmax_over(scaled_logits(torch.where(counted, lp, NEG_INF), temperature), counted)
    if truncation == "renormalize":
        return log_t
    covers = counted.sum(-1) == n_classes
    log_listed = torch.where(covers, 0.0, _lse_or_neg_inf(torch.where(counted, lp, NEG_INF)).clamp(max=0.0))
    none_listed = (log_listed == NEG_INF)[:, None]
    log_t = torch.where(none_listed, NEG_INF, log_t + log_listed[:, None])
    log_t_tail = torch.log(-torch.expm1(log_listed))  # log(1 - L), exact for L near 1
    return torch.cat([log_t, log_t_tail[:, None]], 1)


def sparse_student_buckets(x_at: Tensor, counted: Tensor, *, temperature: float, truncation: str,
                           row_max: Tensor | None = None, lse: Tensor | None = None,
                           lse_unlisted: Tensor | None = None) -> Tensor:
    """The student's side of :func:`sparse_buckets` from its logits at the entries, x_at [N, K]
    (any value where not counted), and under "tail" three [N] statistics of the whole row:
    its max ``row_max`` (a constant), and the log-sum-exp of z = (x - row_max) / T over every
    class (``lse``) and over the classes no counted entry lists (``lse_unlisted``)."""
    if truncation == "renormalize":
        x_at = torch.where(counted, x_at, NEG_INF)
        return _log_softmax_over(scaled_logits(x_at, temperature), counted)
    log_s = torch.where(counted, (x_at - row_max[:, None]) / temperature - lse[:, None], NEG_INF)
    return torch.cat([log_s, (lse_unlisted - lse)[:, None]], 1)


@_validate.kd_keywords
def sparse_kd_loss(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
                   teacher_mask: Tensor | None = None, temperature: float = 1.0, *, truncation: str = "renormalize",
                   **kd) -> Tensor:
    """Reference of :func:`lepton_fast.sparse_kd_loss` on [..., V] logits and [..., K] teacher
    entries (no argument checks): the divergence between the buckets of :func:`sparse_buckets`
    in :func:`_kd_loss`. A row with no counted entry has soft term 0.

    Args:
        KD_KEYWORDS
    """
    k = teacher_indices.shape[-1]
    indices, logprobs = teacher_indices.reshape(-1, k), teacher_logprobs.reshape(-1, k)
    mask = None if teacher_mask is None else teacher_mask.reshape(-1, k)

    def soft(student: Tensor, valid: Tensor | None, kd: dict) -> Tensor:
        read = sparse_teacher_entries(indices, mask, kd["labels"], kd["ignore_index"])
        counted = sparse_counted_entries(indices, read)
        logp_t, logp_s = sparse_buckets(student, indices, logprobs, counted, temperature=kd["temperature"],
                                        truncation=truncation)
        return divergence_rows(logp_t, logp_s, kd["divergence"], kd["beta"])

    return _kd_loss("sparse_kd_loss", student_logits, temperature, kd, soft)


# --- Knowledge distillation over slices of the classes (the vocabulary-parallel loss) -----
# fused_kd_loss split at its steps (csrc/kd_loss.h): each slice's statistics, merged by the
# caller (lepton_fast.ops.kd_loss.SliceMerge), then each slice's gradient. The columns of the
# statistics are KDStat's in csrc/kd_loss.h, named in lepton_fast.ops.kd_loss (the maxima are
# of the raw logits, the sums' exponents (x - max) / T, as in scaled_logits).


def _slice_max(z: Tensor) -> Tensor:
    return z.amax(-1) if z.shape[-1] else z.new_full(z.shape[:-1], NEG_INF)


def _exp_shifted(x: Tensor, m: Tensor, temperature=1.0) -> Tensor:
    """exp((x - m) / T) of [N, C] x and a per-row [N] shift m, in one new buffer (the shift
    subtracted before the division, as in scaled_logits)."""
    out = x - m[:, None]
    if temperature != 1:
        out.div_(temperature)
    return out.exp_()


def _sum_exp(x: Tensor, m: Tensor, temperature=1.0) -> Tensor:
    """sum exp((x - m) / T) along the last dim; 0 where m = -inf (nothing finite)."""
    some = m != NEG_INF
    return torch.where(some, _exp_shifted(x, torch.where(some, m, 0.0), temperature).sum(-1), 0.0)


def _log_sum(s: Tensor) -> Tensor:
    """log s; NaN where s is 0 (no finite entry: the softmax is undefined)."""
    return torch.where(s > 0, torch.where(s > 0, s, 1.0).log(), math.nan)


def _label_columns(labels: Tensor | None, ignore_index: int, class_offset: int, n: int):
    """(rows not ignored or None, the label's column in the slice or -1)."""
    if labels is None:
        return None, None
    valid = labels != ignore_index
    column = labels - class_offset
    return valid, torch.where(valid & (column >= 0) & (column < n), column, -1)


def kd_slice_stats(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, temperature: float,
                   divergence: str, beta: float, alpha: float, label_smoothing: float, ignore_index: int,
                   class_offset: int, n_classes: int) -> Tensor:
    """Each [N, C_r] row slice's statistics, [N, 7] (the columns above); 0 at ignored rows."""
    s, t = _acc(student_logits), _acc(teacher_logits.detach())
    out = s.new_zeros(s.shape[0], N_STATS)
    out[:, MAX_S], out[:, MAX_T] = _slice_max(s), _slice_max(t)
    out[:, SUM_S] = _sum_exp(s, out[:, MAX_S], temperature)
    out[:, SUM_T] = _sum_exp(t, out[:, MAX_T], temperature)
    kind = soft_kind(divergence, beta)
    if kind in ("forward_kl", "reverse_kl"):
        teacher, student = (t, out[:, MAX_T]), (s, out[:, MAX_S])
        (p, m_p), (q, m_q) = (teacher, student) if kind == "forward_kl" else (student, teacher)
        # A = sum exp(u) (u - v) of the offsets from the slice's maxima (kl_from_sums in csrc/kd_loss.h)
        u = p - torch.where(m_p != NEG_INF, m_p, 0.0)[:, None]
        v = torch.where(q != NEG_INF, q - torch.where(m_q != NEG_INF, m_q, 0.0)[:, None], NEG_INF)
        weight = torch.where(p != NEG_INF, (u / temperature).exp(), 0.0)
        # 0 where the weight underflows, as in _kl_rows: q's -inf there would make it 0 * inf
        out[:, KL_SUM] = torch.where(weight != 0, weight * ((u - v) / temperature), 0.0).sum(-1)
    out[:, SUM_CE] = _sum_exp(s, out[:, MAX_S])
    valid, column = _label_columns(labels, ignore_index, class_offset, s.shape[-1])
    if alpha > 0:
        x_label = s.gather(1, column.clamp(min=0)[:, None])[:, 0] if s.shape[-1] else s.new_zeros(s.shape[0])
        out[:, LIN_CE] = torch.where(column >= 0, (1.0 - label_smoothing) * x_label, 0.0)
        if label_smoothing > 0:
            out[:, LIN_CE] += label_smoothing / n_classes * s.sum(-1)
    return out if valid is None else torch.where(valid[:, None], out, 0.0)


def _log_probs(x: Tensor, m: Tensor, s: Tensor, temperature) -> Tensor:
    """log softmax(x / T) of a slice of the rows, from the rows' merged max m and sum s."""
    return (x - m[:, None]) / temperature - _log_sum(s)[:, None]


def kd_slice_jsd_sums(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, stats: Tensor, *,
                      temperature: float, beta: float, ignore_index: int) -> Tensor:
    """The slice's part of K_t = KL(p_t || m) and K_s = KL(p_s || m), [N, 2], from the rows'
    merged statistics; 0 at ignored rows."""
    lps = _log_probs(_acc(student_logits), stats[:, MAX_S], stats[:, SUM_S], temperature)
    lpt = _log_probs(_acc(teacher_logits.detach()), stats[:, MAX_T], stats[:, SUM_T], temperature)
    log_m = _log_mixture(lps, lpt, beta)
    out = torch.stack([_kl_rows(lpt, log_m), _kl_rows(lps, log_m)], 1)
    valid, _ = _label_columns(labels, ignore_index, 0, 0)
    return out if valid is None else torch.where(valid[:, None], out, 0.0)


def kd_slice_rows(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, stats: Tensor,
                  jsd_sums: Tensor | None, *, temperature: float, divergence: str, beta: float, alpha: float,
                  label_smoothing: float, ignore_index: int, scale_by_t2: bool, class_offset: int,
                  n_classes: int) -> tuple[Tensor, Tensor]:
    """The rows of kd_slice_loss (each row's loss [N] as fused_kd_loss gives it, NaN where a
    softmax it needs is undefined; d(row's loss)/d(this slice), the formulas at the top of
    csrc/kd_loss.h, in the accumulation dtype), from the rows' merged statistics; the op
    reduces them."""
    s, t = _acc(student_logits.detach()), _acc(teacher_logits.detach())
    st = stats
    lps = _log_probs(s, st[:, MAX_S], st[:, SUM_S], temperature)
    lpt = _log_probs(t, st[:, MAX_T], st[:, SUM_T], temperature)
    undefined = (st[:, SUM_S] > 0).logical_not() | (st[:, SUM_T] > 0).logical_not()
    kind = soft_kind(divergence, beta)
    rows = s.new_zeros(s.shape[0])
    grad = torch.zeros_like(s)
    if alpha < 1:
        if kind == "forward_kl":
            div = st[:, KL_SUM] / st[:, SUM_T] + (st[:, SUM_S] / st[:, SUM_T]).log()
            d = lps.exp() - lpt.exp()
        elif kind == "reverse_kl":
            div = st[:, KL_SUM] / st[:, SUM_S] + (st[:, SUM_T] / st[:, SUM_S]).log()
            ps = lps.exp()
            d = torch.where(ps == 0, 0.0, ps * (lps - lpt - div[:, None]))
        else:
            div = beta * jsd_sums[:, 0] + (1 - beta) * jsd_sums[:, 1]
            ps = lps.exp()
            log_m = _log_mixture(lps, lpt, beta)
            d = torch.where(ps == 0, 0.0, (1 - beta) * ps * (lps - log_m - jsd_sums[:, 1:]))
        weight = (1 - alpha) * (temperature**2 if scale_by_t2 else 1.0)
        rows = rows + weight * torch.where(undefined, math.nan, div)
        grad = grad + weight / temperature * d
    valid, column = _label_columns(labels, ignore_index, class_offset, s.shape[-1])
    if alpha > 0:
        lse_ce = st[:, MAX_S] + _log_sum(st[:, SUM_CE])
        rows = rows + alpha * (lse_ce - st[:, LIN_CE])
        onehot = torch.zeros_like(s)
        here = column >= 0
        onehot[here.nonzero()[:, 0], column[here]] = 1.0 - label_smoothing
        grad = grad + alpha * ((s - lse_ce[:, None]).exp() - label_smoothing / n_classes - onehot)
    if valid is not None:
        rows, grad = torch.where(valid, rows, 0.0), torch.where(valid[:, None], grad, 0.0)
    return rows, grad


# --- Sparse KD over slices of the classes (the vocabulary-parallel sparse loss) -------------
# sparse_kd_loss split at its two passes over a row, for a rank that holds the [N, C_r] slice of
# the student's classes starting at class_offset (lepton_fast.distributed.vocab_parallel_sparse_kd_loss):
# the slice's statistics (sparse_slice_stats, the op's float64 oracle), merged across slices by
# lepton_fast.ops.sparse_kd_loss.SliceMerge; the rows' loss and the coefficients of their gradient
# from the merged statistics (sparse_slice_rows, [N, K + small]: what the distributed loss runs
# itself); the slice's gradient from those (sparse_slice_grad, the op's oracle). The teacher's
# entries are global class ids, the same on every rank; ``column`` [N, K] is each counted entry's
# column in the slice, -1 for the entries that do not count or lie in another slice
# (sparse_slice_columns). The columns SP_* and GR_* are named in lepton_fast.ops.sparse_kd_loss.
# Each function is row by row: an output row depends only on the same row of every argument.

# The reference kernels of the slice ops (lepton_fast/ops/_reference.py) run over blocks of rows,
# so that their temporaries are a few MiB whatever N and C_r: about this many elements of
# [N, C_r] (4 MiB in float32) a block. Tests set it smaller, to run many blocks.
SPARSE_BLOCK_ELEMENTS = 1 << 20


def row_blocks(n_rows: int, row_elements: int) -> list[slice]:
    """The blocks of rows of an [n_rows, row_elements] tensor (SPARSE_BLOCK_ELEMENTS each)."""
    step = max(1, SPARSE_BLOCK_ELEMENTS // max(row_elements, 1))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def sparse_slice_columns(teacher_indices: Tensor, counted: Tensor, class_offset: int, n_local: int) -> Tensor:
    """Each counted entry's column in the slice [class_offset, class_offset + n_local), else -1, [N, K]."""
    column = teacher_indices - class_offset
    return torch.where(counted & (column >= 0) & (column < n_local), column, -1)


def _unlisted(x: Tensor, column: Tensor) -> Tensor:
    """A copy of the [N, C_r] slice x with the classes a counted entry lists at -inf: x in a
    buffer of one more column, which takes the entries that are not in the slice (column -1),
    so that no [N, C_r] mask is made."""
    n_local = x.shape[-1]
    out = x.new_empty(x.shape[0], n_local + 1)
    out[:, :n_local] = x
    return out.scatter_(1, torch.where(column >= 0, column, n_local), NEG_INF)[:, :n_local]


def _sparse_terms(alpha: float, truncation: str) -> tuple[bool, bool, bool]:
    """(the soft term, "tail"'s buckets, the CE term): which terms a loss has."""
    soft = alpha < 1
    return soft, soft and truncation == "tail", alpha > 0


def sparse_slice_stats(student_logits: Tensor, column: Tensor, labels: Tensor | None, *, temperature: float,
                       alpha: float, label_smoothing: float, truncation: str, ignore_index: int, class_offset: int,
                       n_classes: int) -> Tensor:
    """The slice's statistics against its own maxima, [N, SP_ENTRIES + K] (the columns of
    lepton_fast.ops.sparse_kd_loss): those the terms do not need, and an ignored row's, are
    -inf (maxima) or 0."""
    x = _acc(student_logits.detach())
    n_local = x.shape[-1]
    soft, tail, ce = _sparse_terms(alpha, truncation)
    out = x.new_zeros(x.shape[0], SP_ENTRIES + column.shape[-1])
    out[:, [SP_MAX, SP_MAX_UNLISTED]] = NEG_INF
    if tail or ce:
        out[:, SP_MAX] = _slice_max(x)
    if tail:
        unlisted = _unlisted(x, column)
        out[:, SP_MAX_UNLISTED] = _slice_max(unlisted)
        out[:, SP_SUM] = _sum_exp(x, out[:, SP_MAX], temperature)
        out[:, SP_SUM_UNLISTED] = _sum_exp(unlisted, out[:, SP_MAX_UNLISTED], temperature)
    if ce:
        out[:, SP_SUM_CE] = _sum_exp(x, out[:, SP_MAX])
        _, label_column = _label_columns(labels, ignore_index, class_offset, n_local)
        if n_local and label_column is not None:
            x_label = x.gather(1, label_column.clamp(min=0)[:, None])[:, 0]
            out[:, SP_LIN_CE] = torch.where(label_column >= 0, (1.0 - label_smoothing) * x_label, 0.0)
        if label_smoothing > 0:
            out[:, SP_LIN_CE] += label_smoothing / n_classes * x.sum(-1)
    if soft and n_local:
        out[:, SP_ENTRIES:] = torch.where(column >= 0, x.gather(1, column.clamp(min=0)), 0.0)
    if labels is None:
        return out
    ignored = out.new_zeros(out.shape[1])
    ignored[[SP_MAX, SP_MAX_UNLISTED]] = NEG_INF
    return torch.where((labels != ignore_index)[:, None], out, ignored)


def sparse_slice_rows(counted: Tensor, teacher_logprobs: Tensor, labels: Tensor | None, stats: Tensor, *,
                      temperature: float, divergence: str, beta: float, truncation: str, alpha: float,
                      label_smoothing: float, ignore_index: int, scale_by_t2: bool, n_classes: int,
                      coefficients: bool = False, grad_divisor=1) -> tuple[Tensor, Tensor | None]:
    """(each row's loss as :func:`sparse_kd_loss` sums it, [N] (0 at ignored rows); with
    ``coefficients``, the coefficients [N, GR_ENTRIES + K] of sparse_slice_grad that give
    d(the rows' sum)/d(the slice) / ``grad_divisor`` (the divisor of the caller's reduction,
    :func:`reduction_divisor`), else None), from the rows' ``stats`` merged over every slice
    (sparse_slice_stats' columns).

    The loss is :func:`sparse_buckets`' divergence and the CE written over the merged
    statistics (:func:`sparse_student_buckets`); autograd gives its derivatives with respect
    to them, [N, <= K + 4], and the chain rule through each statistic's derivative (the
    softmax for a log-sum-exp, the one-hot for a gathered logit) gives the coefficients.
    """
    n_rows = stats.shape[0]
    soft, tail, ce = _sparse_terms(alpha, truncation)
    valid = torch.ones(n_rows, dtype=torch.bool, device=stats.device) if labels is None else labels != ignore_index
    # Ignored rows get harmless statistics: their slices may hold anything, and so their sums.
    keep = lambda t: torch.where(valid, t, 0.0)  # noqa: E731
    row_max = keep(stats[:, SP_MAX])
    leaves = {}
    with torch.enable_grad():
        rows = stats.new_zeros(n_rows)
        if soft:
            leaves["at"] = stats[:, SP_ENTRIES:].clone().requires_grad_()
            log_t = sparse_teacher_buckets(teacher_logprobs, counted, n_classes, temperature=temperature,
                                           truncation=truncation, dtype=stats.dtype)
            merged = {}
            if tail:
                leaves["lse"] = keep(_log_sum(stats[:, SP_SUM])).requires_grad_()
                log_u = (stats[:, SP_MAX_UNLISTED] - row_max) / temperature + stats[:, SP_SUM_UNLISTED].log()
                leaves["lse_u"] = keep(log_u).requires_grad_()
                merged = dict(row_max=row_max, lse=leaves["lse"], lse_unlisted=leaves["lse_u"])
            log_s = sparse_student_buckets(leaves["at"], counted, temperature=temperature, truncation=truncation,
                                           **merged)
            weight = (1.0 - alpha) * (temperature**2 if scale_by_t2 else 1.0)
            rows = rows + weight * divergence_rows(log_t, log_s, divergence, beta)
        if ce:
            leaves["lse_ce"] = keep(row_max + _log_sum(stats[:, SP_SUM_CE])).requires_grad_()
            leaves["lin_ce"] = keep(stats[:, SP_LIN_CE]).requires_grad_()
            rows = rows + alpha * (leaves["lse_ce"] - leaves["lin_ce"])
        rows = torch.where(valid, rows, 0.0)
        d = dict(zip(leaves, torch.autograd.grad(rows.sum(), list(leaves.values())))) if coefficients else None
    if d is None:
        return rows.detach(), None
    # Each row's factors (the reduction's divisor, 1 / T, a softmax's 1 / sum) go into its
    # coefficients, so that each [N, C_r] term is one exp and one multiply-add.
    d = {name: value / grad_divisor for name, value in d.items()}
    coef = stats.new_zeros(n_rows, GR_ENTRIES + counted.shape[-1])
    if tail or ce:
        coef[:, GR_MAX] = row_max
    if tail:  # d lse / dx = softmax(z) / T; d lse_u / dx = the softmax of z over the unlisted classes / T
        coef[:, GR_SOFTMAX] = d["lse"] / (temperature * stats[:, SP_SUM])
        sum_u = stats[:, SP_SUM_UNLISTED]
        some_u = sum_u > 0  # else every class of the row is listed (or -inf): no tail
        coef[:, GR_MAX_UNLISTED] = torch.where(some_u, stats[:, SP_MAX_UNLISTED], 0.0)
        coef[:, GR_UNLISTED] = torch.where(some_u, d["lse_u"] / (temperature * sum_u), 0.0)
    if ce:  # d lse_ce / dx = softmax(x) = exp(x - max) / sum; d lin_ce / dx = (1 - eps) one-hot(label) + eps / C
        coef[:, GR_SOFTMAX_CE] = d["lse_ce"] / stats[:, SP_SUM_CE]
        coef[:, GR_CONST] = d["lin_ce"] * (label_smoothing / n_classes)
        coef[:, GR_LABEL] = (1.0 - label_smoothing) * d["lin_ce"]
    if soft:  # each gathered logit is its class's
        coef[:, GR_ENTRIES:] = d["at"]
    # An ignored row's statistics may be anything (0 / 0): its coefficients are 0.
    return rows.detach(), torch.where(valid[:, None], coef, 0.0)


def _term(coefficient: Tensor, exps: Tensor) -> Tensor:
    """coefficient [N] times exps [N, C_r], 0 where the coefficient is 0 (whatever the exps)."""
    return torch.where(coefficient[:, None] != 0, coefficient[:, None] * exps, 0.0)


def sparse_slice_grad(student_logits: Tensor, column: Tensor, labels: Tensor | None, coefficients: Tensor, *,
                      temperature: float, ignore_index: int, class_offset: int) -> Tensor:
    """d(loss)/d(the slice) from the rows' ``coefficients`` (:func:`sparse_slice_rows`), in the
    student's dtype: the formula of lepton_fast.ops.sparse_kd_loss's sparse_slice_grad."""
    x = _acc(student_logits.detach())
    c = coefficients.to(x.dtype)
    n_local = x.shape[-1]
    grad = c[:, GR_CONST, None] + _term(c[:, GR_SOFTMAX], _exp_shifted(x, c[:, GR_MAX], temperature))
    grad += _term(c[:, GR_UNLISTED], _exp_shifted(_unlisted(x, column), c[:, GR_MAX_UNLISTED], temperature))
    grad += _term(c[:, GR_SOFTMAX_CE], _exp_shifted(x, c[:, GR_MAX]))
    valid, label_column = _label_columns(labels, ignore_index, class_offset, n_local)
    if n_local:
        if label_column is not None:
            grad.scatter_add_(1, label_column.clamp(min=0)[:, None],
                              torch.where(label_column >= 0, c[:, GR_LABEL], 0.0)[:, None])
        grad.scatter_add_(1, column.clamp(min=0), torch.where(column >= 0, c[:, GR_ENTRIES:], 0.0))
    if valid is not None:  # an ignored row's slice may hold anything (0 * inf)
        grad = torch.where(valid[:, None], grad, 0.0)
    return grad.to(student_logits.dtype)


def lm_head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, logit_scale: float = 1.0,
                   softcap: float | None = None) -> Tensor:
    """Logits of an lm_head in the accumulation dtype: softcap * tanh(scale * (h @ W.T + b) / softcap),
    the tanh only when ``softcap`` is given (Gemma-2's final-logit soft-capping)."""
    z = _acc(hidden) @ _acc(weight).T
    if bias is not None:
        z = z + _acc(bias)
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    vocab_size: int | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    **kd_kwargs,
) -> Tensor:
    """Reference of :func:`lepton_fast.fused_linear_kd_loss` (no argument checks): both heads
    projected in full, cut to ``vocab_size`` (default: the student's), then :func:`fused_kd_loss`
    with ``kd_kwargs``. Autograd gives the gradients of the hidden states, weight and bias."""
    v = student_weight.shape[0] if vocab_size is None else vocab_size
    cut = lambda b: None if b is None else b[:v]  # noqa: E731
    z_s = lm_head_logits(student_hidden, student_weight[:v], cut(student_bias), student_logit_scale, student_softcap)
    z_t = lm_head_logits(teacher_hidden.detach(), teacher_weight[:v].detach(), cut(teacher_bias),
                         teacher_logit_scale, teacher_softcap)
    return fused_kd_loss(z_s, z_t, temperature, **kd_kwargs)


def fused_linear_sparse_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_mask: Tensor | None = None,
    temperature: float = 1.0,
    *,
    student_bias: Tensor | None = None,
    vocab_size: int | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    **kd_kwargs,
) -> Tensor:
    """Reference of :func:`lepton_fast.fused_linear_sparse_kd_loss` (no argument checks): the
    student's head projected in full, cut to ``vocab_size``, then :func:`sparse_kd_loss` with
    ``kd_kwargs``. Autograd gives the gradients of the hidden states, weight and bias."""
    v = student_weight.shape[0] if vocab_size is None else vocab_size
    z = lm_head_logits(student_hidden, student_weight[:v], None if student_bias is None else student_bias[:v],
                       student_logit_scale, student_softcap)
    return sparse_kd_loss(z, teacher_indices, teacher_logprobs, teacher_mask, temperature, **kd_kwargs)

# --- Pseudo-labels (FixMatch, Sohn et al. 2020) ------------------------------------------


def select_pseudo_labels(
    logits: Tensor, threshold: float = 0.95, temperature: float = 1.0, class_thresholds: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(labels int64 [...], confidence [...], mask bool [...]) of [..., C] logits, no grad.

    labels = argmax (ties: the lowest class index); confidence = max softmax(logits / T),
    float32 (float64 for float64 logits); mask = confidence >= threshold, or
    >= class_thresholds[label] when a [C] tensor is given (>=, as FixMatch and USB use).
    """
    z = scaled_logits(_acc(logits.detach()), temperature)
    labels = z.argmax(-1)
    confidence = torch.softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    cut = threshold if class_thresholds is None else class_thresholds.to(confidence.dtype)[labels]
    return labels, confidence, confidence >= cut


def pseudo_label_loss_rows(
    strong_logits: Tensor,
    weak_logits: Tensor,
    threshold: float = 0.95,
    temperature: float = 1.0,
    soft: bool = False,
    class_thresholds: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row loss [N], labels, confidence, mask) of [N, C] strong- and weak-view logits.

    row = w * CE(strong, target): the target is the weak view's pseudo-label (soft=False) or
    softmax(weak / T) (soft=True), CE at T = 1 on the strong view; w = mask, or
    ``weights[row]`` when given (SoftMatch). Rows with w = 0 are 0 and get no gradient.
    """
    labels, confidence, mask = select_pseudo_labels(weak_logits, threshold, temperature, class_thresholds)
    strong = _acc(strong_logits)
    w = mask.to(strong.dtype) if weights is None else _acc(weights.detach()).to(strong.dtype)
    kept = (w != 0).unsqueeze(-1)
    # Left-out rows may hold anything (even all -inf): zero them so no NaN can reach autograd.
    logp = torch.log_softmax(torch.where(kept, strong, 0.0), -1)
    if soft:
        target = torch.softmax(scaled_logits(_acc(weak_logits.detach()).to(strong.dtype), temperature), -1)
        ce = -torch.where(target > 0, target * logp, 0.0).sum(-1)
    else:
        ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(w != 0, w * ce, 0.0), labels, confidence, mask


def reduce_pseudo_label_rows(rows: Tensor, reduction: str) -> Tensor:
    """fused_pseudo_label_loss's rows [N] reduced: "mean" divides by ALL rows, selected or not
    (FixMatch's unlabeled loss)."""
    return reduce_rows(rows, reduction, max(rows.shape[0], 1))


def fused_pseudo_label_loss(
    strong_logits: Tensor,
    weak_logits: Tensor,
    threshold: float = 0.95,
    temperature: float = 1.0,
    soft: bool = False,
    class_thresholds: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`lepton_fast.fused_pseudo_label_loss` on [..., C] logits (no
    argument checks): (loss, labels [...], confidence [...], mask [...], class_counts [C]).

    "mean" divides by ALL rows, selected or not (FixMatch's unlabeled loss).
    """
    lead, n_classes = strong_logits.shape[:-1], strong_logits.shape[-1]
    flat_weights = None if weights is None else weights.reshape(-1)
    rows, labels, confidence, mask = pseudo_label_loss_rows(
        strong_logits.reshape(-1, n_classes), weak_logits.reshape(-1, n_classes), threshold, temperature,
        soft, class_thresholds, flat_weights,
    )
    loss = reduce_pseudo_label_rows(rows, reduction).reshape(lead if reduction == "none" else ())
    counts = selected_class_counts(labels, mask, n_classes)
    return loss, labels.reshape(lead), confidence.reshape(lead), mask.reshape(lead), counts


def selected_class_counts(labels: Tensor, mask: Tensor, n_classes: int) -> Tensor:
    """int64 [C]: how many selected rows carry each pseudo-label (O(N), no host sync)."""
    counts = torch.zeros(n_classes, dtype=torch.int64, device=labels.device)
    return counts.index_add_(0, labels.reshape(-1), mask.reshape(-1).to(torch.int64))
# --- Adversarial perturbation steps (Goodfellow et al. 2015; Madry et al. 2018) ---------------
# Each is written as the usual composition of torch ops (as torchattacks writes it), in the
# accumulation dtype: for float32 inputs it is exactly the eager composition, and the kernels
# reproduce it bit for bit; low-precision inputs are rounded once, at the end. eps, step_size
# and the clamp bounds are numbers or tensors that broadcast to the input.


def _operand(value, like: Tensor):
    return value.to(like.dtype) if isinstance(value, Tensor) else value


def _clamp(x: Tensor, clamp) -> Tensor:
    # In two calls, the values of torch.clamp(x, lo, hi), for a number beside a tensor too.
    return x if clamp is None else x.clamp(min=_operand(clamp[0], x)).clamp(max=_operand(clamp[1], x))


def fgsm_perturb(x: Tensor, grad: Tensor, eps, clamp=(0.0, 1.0)) -> Tensor:
    """clamp(x + eps * sign(grad)); sign(0) = sign(NaN) = 0 leaves an element unchanged."""
    xa = _acc(x)
    out = xa + _operand(eps, xa) * grad.sign().to(xa.dtype)
    return _clamp(out, clamp).to(x.dtype)


def pgd_step(x_adv: Tensor, x_orig: Tensor, grad: Tensor, step_size, eps, clamp=(0.0, 1.0)) -> Tensor:
    """One L-inf PGD step: x' = x_adv + step_size * sign(grad), projected onto the ball of
    radius eps around x_orig as x_orig + clamp(x' - x_orig, -eps, eps), then clamped."""
    xa, xo = _acc(x_adv), _acc(x_orig)
    eps = _operand(eps, xa)
    stepped = xa + _operand(step_size, xa) * grad.sign().to(xa.dtype)
    delta = torch.clamp(stepped - xo, -eps, eps)
    return _clamp(xo + delta, clamp).to(x_adv.dtype)
