"""fused_linear_kd_loss: distillation through both lm_heads, the [N, V] logits never materialised.

Mechanism. The rows are cut into chunks; for each chunk two GEMMs give the student's and the
teacher's logits in float32, the fused row kernel of ``fused_kd_loss`` (the same op, on every
device: CPU C++, CUDA C++, Triton) gives the chunk's loss and d(loss)/d(logits) in one pass,
and two more GEMMs turn that gradient into the chunk's rows of d(loss)/d(student_hidden) and
its contribution to d(loss)/d(student_weight) (accumulated in float32). The whole loop is one
``torch.library.custom_op`` (``lepton_fast::fused_linear_kd_loss``) with one autograd formula,
so torch.compile sees a single opaque op and the backward only scales the gradients the
forward wrote.

Why a Python loop over ATen GEMMs and not C++ or one fused Triton kernel: the four GEMMs are
the floor of this op (4 x 2·N·H·V flops) and cuBLAS / oneDNN already run them at the
machine's peak; what remains per chunk is the row kernel plus about fifteen dispatcher calls.
Measured on the shared 2-core CPU (load 8.8, one thread): 2000 chunks of one row (H = V = 8)
cost 0.17 ms per chunk more than one chunk of 2000 rows, the fused_kd_loss call included
(0.16 ms for that public call alone at that load), while one auto-sized chunk (640 rows) of
the 2048 x 1024 x 32000 benchmark is ~170 GFLOP of GEMMs, seconds here: a C++ loop could
save under 0.01 %. On a GPU the launches are asynchronous, so the host stays ahead of the
device as long as a chunk's GEMMs outlast its ~15 launches (a 576-row chunk at V = 128256,
H = 4096 is 2.4 TFLOP, milliseconds).

Memory: per chunk the float32 student and teacher logits, the row kernel's gradient and, for
bfloat16/float16 weights on the GPU, that gradient rounded for the GEMMs; plus the float32
weight-gradient accumulator when the weights are not float32. ``chunk_size=None`` sizes the
chunk so that its buffers fit in ``CHUNK_BUDGET_BYTES`` (256 MiB on the CPU, 1 GiB elsewhere).

Ignored rows (label == ignore_index): on the CPU they are left out before the GEMMs (the
labels are host memory, so finding the valid rows is no device synchronisation) and cost
nothing. On a GPU, finding them would need their count on the host; the chunks keep every row
there, the row kernel gives the ignored ones zero loss and gradient, and their GEMM share is
still paid (skipping it without a synchronisation needs GEMMs that read the row count on the
device).

Vocabulary-parallel use (``group=``): each rank passes its [V_r, H] weight slices; the loop
stays as it is, the row kernel becomes the vocabulary-parallel one (lepton_fast.distributed:
every chunk's row statistics all-reduced between the kd_slice_* ops) and
d(loss)/d(student_hidden) is all-reduced once at the end. A process group cannot be an
argument of a custom op's schema, so the op reads this rank's split from ``_VOCAB_SPLIT``,
which only fused_linear_kd_loss sets, around its call of the op.
"""
from __future__ import annotations

import contextvars
from typing import Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate
from lepton_fast.ops import _autograd, kd_loss
from lepton_fast.ops.kd_loss import SPEC as KD_SPEC

Scalar = Union[float, Tensor]

# The chunk's buffers (float32 logits of both heads, the row gradient, its low-precision copy)
# stay under this many bytes when chunk_size is None (_auto_chunk_size), by device type. The
# CPU's GEMMs run at full speed from a few hundred rows; a GPU's want more rows per GEMM, and
# at V = 128256 a GiB is ~600 rows, leaving the 4 GB target of the H200 case room for the
# float32 weight-gradient accumulator of a bfloat16 head (2 GiB at H = 4096).
CHUNK_BUDGET_BYTES = {"cpu": 256 << 20, "other": 1 << 30}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# lepton_fast.distributed.VocabSplit while fused_linear_kd_loss(group=) runs the op; else None.
_VOCAB_SPLIT: contextvars.ContextVar = contextvars.ContextVar("lepton_fast_vocab_split", default=None)


def _grad_through_head(grad: Tensor, logits: Tensor, scale: float, softcap: Optional[float]) -> Tensor:
    """d(loss)/d(h @ W.T + b) from d(loss)/d(z), in place, for z = cap * tanh(scale * x / cap):
    dz/dx = scale * (1 - (z / cap)^2). Overwrites ``logits`` (no longer needed)."""
    if softcap is not None:
        grad.mul_(logits.div_(softcap).square_().neg_().add_(1.0).mul_(scale))
    elif scale != 1.0:
        grad.mul_(scale)
    return grad


def _project(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], scale: float, softcap: Optional[float],
             out: Tensor) -> Tensor:
    """The chunk's logits softcap * tanh(scale * (h @ W.T + b) / softcap) in ``out`` (float32 or
    float64), straight out of the GEMM: never rounded to the weights' dtype first."""
    if hidden.dtype == out.dtype:
        torch.mm(hidden, weight.T, out=out)
    else:  # bfloat16/float16 operands on the GPU: cuBLAS accumulates and writes float32
        torch.mm(hidden, weight.T, out_dtype=out.dtype, out=out)
    if bias is not None:
        out.add_(bias)
    if softcap is not None:
        out.mul_(scale / softcap).tanh_().mul_(softcap)
    elif scale != 1.0:
        out.mul_(scale)
    return out


def _entropy_rows(logits: Tensor, inv_temperature: float) -> Tensor:
    """Entropy (nats) of softmax(logits / T) per row, no gradient: lse - sum p * z."""
    z = logits * inv_temperature
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    return -torch.bmm(log_p.exp().unsqueeze(1), log_p.unsqueeze(2)).reshape(-1)


def _auto_chunk_size(n_rows: int, vocab: int, acc: torch.dtype, weight_dtype: torch.dtype, device) -> int:
    per_row = vocab * (3 * acc.itemsize)  # student and teacher logits, the row gradient
    if weight_dtype != acc and device.type != "cpu":
        per_row += vocab * weight_dtype.itemsize  # the gradient rounded for the GEMMs
    rows = CHUNK_BUDGET_BYTES["cpu" if device.type == "cpu" else "other"] // per_row
    if rows >= 128:
        rows -= rows % 64  # whole GEMM tiles on a GPU
    return max(1, min(n_rows, rows))


@torch.library.custom_op("lepton_fast::fused_linear_kd_loss", mutates_args=())
def _fused_linear_kd_loss(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    student_bias: Optional[Tensor], teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    temperature: Tensor, beta: Tensor, alpha: Tensor, label_smoothing: Tensor, divergence: str, ignore_index: int,
    scale_by_t2: bool, reduction: str, num_items_in_batch: Optional[Tensor], vocab_size: int,
    student_logit_scale: float, teacher_logit_scale: float, student_softcap: Optional[float],
    teacher_softcap: Optional[float], chunk_size: int, row_weights: Optional[Tensor], grad_hidden: bool,
    grad_weight: bool, grad_bias: bool, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[N, H_s], [V_s, H_s], [N, H_t], [V_t, H_t] -> (loss, d/d student_hidden, d/d student_weight,
    d/d student_bias, sum of the student's entropy over the rows that count). A gradient not
    asked for, and the entropy when ``entropy`` is False, come back as empty tensors.

    reduction "none" with ``row_weights`` [N] gives the gradient of sum(row_weights * loss)
    (its backward); "mean" divides by ``num_items_in_batch`` or the count of valid rows."""
    device, n = student_hidden.device, student_hidden.shape[0]
    acc = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
    empty = lambda: student_hidden.new_empty((0,))  # noqa: E731  (outputs must not alias each other)
    ws, wt = student_weight[:vocab_size], teacher_weight[:vocab_size]
    bs = None if student_bias is None else student_bias[:vocab_size].to(acc)
    bt = None if teacher_bias is None else teacher_bias[:vocab_size].to(acc)
    # GEMM operands: the GPU multiplies bfloat16/float16 with float32 output; the CPU has no such
    # GEMM, so there (and for any other pair of dtypes) a head is widened to the accumulation
    # dtype once per call (what TRL's chunked loss does off the GPU too).
    widen_s, widen_t = (device.type == "cpu" or w.dtype not in _LOW_PRECISION or acc != torch.float32
                        for w in (ws, wt))
    ws, wt = (ws.to(acc) if widen_s else ws), (wt.to(acc) if widen_t else wt)

    valid = None if labels is None else labels != ignore_index
    rows = None  # the rows the chunks run over: all of them, or on the CPU the valid ones
    if valid is not None and device.type == "cpu":
        rows = valid.nonzero().reshape(-1)
    n_rows = n if rows is None else rows.numel()

    # The divisor of "mean" (or num_items_in_batch) reaches every chunk's kernel, which divides
    # the chunk's sum and gradient by it. It lives on the device, where the kernels read it: a
    # fill, not a copy from pageable host memory (which would synchronise the stream).
    kd_reduction, divisor = ("none", None) if reduction == "none" else ("sum", num_items_in_batch)
    if reduction in ("mean", "batchmean") and divisor is None:
        divisor = (torch.full((), float(n), dtype=torch.float64, device=device) if valid is None
                   else valid.sum().clamp(min=1).to(torch.float64))
    elif divisor is not None and divisor.device != device:
        divisor = torch.full((), float(divisor), dtype=torch.float64, device=device)

    loss = torch.zeros((n,) if reduction == "none" else (), dtype=acc, device=device)
    d_hidden = torch.zeros_like(student_hidden) if grad_hidden else empty()
    d_weight = torch.zeros_like(student_weight) if grad_weight else empty()
    d_bias = torch.zeros_like(student_bias) if grad_bias else empty()
    # d/d weight and bias accumulate over the chunks in float32 (float64 for float64)
    acc_weight = (d_weight[:vocab_size] if d_weight.dtype == acc else
                  torch.zeros(ws.shape, dtype=acc, device=device)) if grad_weight else None
    acc_bias = torch.zeros(vocab_size, dtype=acc, device=device) if grad_bias else None
    entropy_sum = torch.zeros((), dtype=acc, device=device) if entropy else empty()
    compute_grad = grad_hidden or grad_weight or grad_bias

    split = _VOCAB_SPLIT.get()
    chunk = min(chunk_size, max(n_rows, 1))
    buf_s = torch.empty((chunk, vocab_size), dtype=acc, device=device)
    buf_t = torch.empty((chunk, vocab_size), dtype=acc, device=device)
    inv_t = 1.0 / float(temperature)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        if rows is None:
            index, take = None, (lambda x: x[start:end])
        else:
            index = rows[start:end]
            take = lambda x: x.index_select(0, index)  # noqa: E731
        h_s, h_t = take(student_hidden), take(teacher_hidden)
        h_s, h_t = (h_s.to(acc) if widen_s else h_s), (h_t.to(acc) if widen_t else h_t)
        z_s = _project(h_s, ws, bs, student_logit_scale, student_softcap, buf_s[: end - start])
        z_t = _project(h_t, wt, bt, teacher_logit_scale, teacher_softcap, buf_t[: end - start])
        chunk_labels = None if labels is None else take(labels)
        if split is None:
            part, grad = torch.ops.lepton_fast.fused_kd_loss.default(
                z_s, z_t, chunk_labels, temperature, beta, alpha, label_smoothing, divergence, ignore_index,
                scale_by_t2, kd_reduction, divisor, compute_grad)
        else:
            from lepton_fast import distributed

            a = kd_loss.KDArgs(z_s, z_t, chunk_labels, z_s.shape[:-1], temperature, beta, alpha, label_smoothing,
                               divisor, compute_grad)
            part, grad = distributed.chunk_loss_and_grad(split, a, divergence, ignore_index, scale_by_t2,
                                                         kd_reduction)
        if entropy:
            rows_entropy = _entropy_rows(z_s, inv_t)
            if rows is None and valid is not None:
                rows_entropy = rows_entropy * take(valid)
            entropy_sum += rows_entropy.sum()
        if reduction != "none":
            loss += part
        elif index is None:
            loss[start:end] = part
        else:
            loss.index_copy_(0, index, part)
        if not compute_grad:
            continue
        if row_weights is not None:
            torch.ops.lepton_fast.scale_grad_(grad, take(row_weights).to(grad.dtype))
        grad = _grad_through_head(grad, z_s, student_logit_scale, student_softcap)
        if grad_bias:
            acc_bias += grad.sum(0)
        if not widen_s:
            grad = grad.to(ws.dtype)  # the GEMM operands of a bfloat16/float16 head on the GPU
        if grad_hidden:
            if index is None and d_hidden.dtype == grad.dtype:
                torch.mm(grad, ws, out=d_hidden[start:end])
            elif index is None:
                d_hidden[start:end] = grad @ ws
            else:
                d_hidden.index_copy_(0, index, (grad @ ws).to(d_hidden.dtype))
        if grad_weight:
            if acc_weight.dtype == grad.dtype:
                acc_weight.addmm_(grad.T, h_s)
            else:
                torch.addmm(acc_weight, grad.T, h_s, out_dtype=acc_weight.dtype, out=acc_weight)
    if grad_weight and acc_weight.data_ptr() != d_weight.data_ptr():
        d_weight[:vocab_size] = acc_weight
    if grad_bias:
        d_bias[:vocab_size] = acc_bias
    if split is not None and grad_hidden:
        torch.distributed.all_reduce(d_hidden, group=split.group)  # every slice's part of dL/dh
    return loss, d_hidden, d_weight, d_bias, entropy_sum


@_fused_linear_kd_loss.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, labels,
      temperature, beta, alpha, label_smoothing, divergence, ignore_index, scale_by_t2, reduction,
      num_items_in_batch, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
      chunk_size, row_weights, grad_hidden, grad_weight, grad_bias, entropy):
    acc = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
    empty = lambda: student_hidden.new_empty((0,))  # noqa: E731
    loss = student_hidden.new_empty((student_hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    return (loss, torch.empty_like(student_hidden) if grad_hidden else empty(),
            torch.empty_like(student_weight) if grad_weight else empty(),
            torch.empty_like(student_bias) if grad_bias else empty(),
            student_hidden.new_empty((), dtype=acc) if entropy else empty())


_DIFFERENTIABLE = {0: "grad_hidden", 1: "grad_weight", 4: "grad_bias"}  # input position -> output flag


def _setup_context(ctx, inputs, output):
    loss, d_hidden, d_weight, d_bias, entropy_sum = output
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias, entropy_sum)
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[14]
    ctx.computed = inputs[23:26]  # grad_hidden, grad_weight, grad_bias: the gradients the forward wrote
    ctx.used = False
    if ctx.reduction == "none":
        # The gradient depends on the per-row grad_output: recomputed in the backward.
        ctx.inputs = inputs
    else:
        ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _backward(ctx, grad_loss, *_):
    _autograd.check_backward(ctx, "fused_linear_kd_loss")
    grads = [None] * 27
    if grad_loss is None:
        return tuple(grads)
    if ctx.reduction == "none":
        args = list(ctx.inputs)
        args[22], args[26] = grad_loss.reshape(-1), False  # row weights; no entropy
        args[23:26] = [ctx.needs_input_grad[position] for position in _DIFFERENTIABLE]
        _, *saved, _ = _fused_linear_kd_loss(*args)
    else:
        saved = ctx.saved_tensors
    for (position, flag), grad, computed in zip(_DIFFERENTIABLE.items(), saved, ctx.computed):
        if not ctx.needs_input_grad[position]:
            continue
        if ctx.reduction != "none" and not computed:  # (the flag: a rank's empty bias slice has an empty gradient)
            raise RuntimeError(f"fused_linear_kd_loss: the forward ran with {flag}=False, so it has no gradient for "
                               "an input that requires one")
        # Recomputed with grad_output already in it, or scaled by it now.
        grads[position] = grad if ctx.reduction == "none" else _autograd.times(grad, grad_loss)
    return tuple(grads)


_fused_linear_kd_loss.register_autograd(_backward, setup_context=_setup_context)


def _autocast(hidden, weight):
    """Under torch.autocast, a head's hidden states and weight in autocast's dtype, as F.linear
    would multiply them (a bfloat16 hidden state meets a float32 lm_head in mixed-precision
    training). The cast is differentiable: a float32 weight gets a float32 gradient. Outside
    autocast, or for non-tensors and meta tensors (which autocast has no key for), which the
    checks then name, unchanged. (torch.amp.is_autocast_available would say so for any device,
    but torch 2.11's Dynamo cannot trace it.)"""
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor)):
        return hidden, weight
    device = hidden.device.type
    if device == "meta" or not torch.is_autocast_enabled(device):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    temperature: Scalar = 1.0,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    divergence: str = "forward_kl",
    beta: Scalar = 0.5,
    labels: Optional[Tensor] = None,
    alpha: Scalar = 0.0,
    label_smoothing: Scalar = 0.0,
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    vocab_size: Optional[int] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    r"""Knowledge distillation through both models' lm_heads, the [N, V] logits never
    materialised (Hinton, Vinyals & Dean 2015; generalized JSD of Agarwal et al. 2024).

    Exactly :func:`lepton_fast.fused_kd_loss` ``(z_s, z_t, temperature, ...)`` with, per model,

    .. math:: z = c \tanh\big(\mathrm{scale}\,(h W^\top + b) / c\big)

    (the tanh only when the softcap c is given, as Gemma-2's final-logit soft-capping; no
    scale and no softcap give the plain ``h @ W.T + b``). The rows are processed in chunks:
    per chunk both heads' logits come out of the GEMM in float32, the fused kernel forms the
    loss and p_s - p_t in float32, and the gradients of ``student_hidden``, ``student_weight``
    and ``student_bias`` are computed during the forward (the weight's and bias's accumulated
    over the chunks in float32 whatever their dtype); the backward only scales them.

    Args:
        student_hidden: [..., H_s] float32, bfloat16, float16 or float64, the student's final
            hidden states. Gradient flows here.
        student_weight: [V, H_s], the student's lm_head weight, same dtype. Gradient flows here.
        teacher_hidden: [..., H_t], same leading dims; a constant. H_t may differ from H_s.
        teacher_weight: [V_t, H_t], same dtype as teacher_hidden; a constant.
        temperature: T > 0, documented range 1e-8 <= T <= 1e4 (a float or a 0-d CPU tensor, as are
            beta, alpha, label_smoothing).
        student_bias, teacher_bias: optional [V] / [V_t] lm_head biases; the student's gets a
            gradient.
        divergence, beta, labels, alpha, label_smoothing, ignore_index, scale_by_t2,
        reduction, num_items_in_batch: as in :func:`lepton_fast.fused_kd_loss` (labels are
            [...] class ids < vocab size; the hard-label CE uses the student's logits at T=1;
            ``num_items_in_batch`` divides the summed loss, as TRL and transformers do under
            gradient accumulation). Rows labelled ``ignore_index`` cost nothing on the CPU
            (left out before the GEMMs) and need no host synchronisation anywhere.
        vocab_size: the shared vocabulary when V != V_t (heads padded to a multiple of 64,
            say): both heads are cut to their first ``vocab_size`` rows; the student's rows
            beyond it get zero gradient. Without it, V != V_t is an error. The shorter head
            is never zero-padded (that would put probability mass on the padded classes).
        student_logit_scale, teacher_logit_scale: finite multipliers of each head's logits,
            before the softcap (Cohere's ``logit_scale``, Granite's 1/``logits_scaling``).
        student_softcap, teacher_softcap: None, or c > 0 for the tanh soft-capping.
        chunk_size: rows per chunk (> 0). None: as many as keep the chunk's buffers (float32
            logits of both heads and the row gradient, 12 bytes x V per row) under 256 MiB
            on the CPU, 1 GiB on a GPU. The result does not depend on it beyond float32
            rounding.
        backend: the row kernel, as in :func:`lepton_fast.fused_kd_loss`: ``"cpu"``,
            ``"cuda"``, ``"triton"`` or ``"reference"`` (lepton_fast.reference's row loss
            under the op's schema, chunk by chunk as the others). Forcing a kernel is
            eager-only, and applies to the forward: with reduction "none" the backward
            recomputes the gradients with the default kernel.
        group: a torch.distributed process group whose ranks split the vocabulary (an lm_head
            sharded as Megatron's ColumnParallelLinear), or None for one device. Each rank
            passes its contiguous [V_r, H] slices of both heads (and of the biases), in rank
            order, sizes may differ; hidden states and labels (global class ids) are the same
            on every rank, as is ``chunk_size``. Every rank gets the loss of the whole
            vocabulary, the gradient of its weight and bias slices, and the gradient of the
            hidden states all-reduced over the group. Per chunk the rows' statistics take the
            all-reduces of :func:`lepton_fast.distributed.vocab_parallel_kd_loss`, plus one of
            [N, H_s] at the end; the backward none. Eager only; not with reduction "none"
            or ``vocab_size``.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for ``"none"``.

    Raises:
        TypeError: non-tensor or non-floating inputs, a weight of another dtype than its
            hidden states, non-integer labels, a hyper-parameter that is not a number.
        ValueError: mismatched shapes or devices, V != V_t without ``vocab_size`` (the message
            names both), ``vocab_size`` outside [1, min(V, V_t)], a non-positive chunk_size or
            softcap, a non-finite logit scale, and everything :func:`fused_kd_loss` refuses.
        RuntimeError: a forced backend that cannot run here; a second backward through one
            graph, or a second-order gradient (differentiate
            :func:`lepton_fast.reference.fused_linear_kd_loss` for those).

    Autocast: under ``torch.autocast`` each head's hidden states and weight are cast to
    autocast's dtype first, as ``F.linear`` would cast them (a bfloat16 hidden state with a
    float32 lm_head works; the float32 weight gets its gradient through the cast, which costs a
    [V, H] copy per call); the logits and the loss are float32 as always.

    Memory: the chunk's buffers, the float32 weight-gradient accumulator when the weight is
    not float32 ([V, H_s]), and the gradients themselves; no buffer of N x V elements of any
    dtype. Time: the four GEMMs (student and teacher logits, d hidden, d weight; 8·N·H·V flops
    for H_s = H_t = H) plus the row kernel.
    """
    # Every argument spelled out: Dynamo (torch 2.11) cannot trace locals().
    try:
        return _linear_kd(
            student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, student_bias=student_bias,
            teacher_bias=teacher_bias, divergence=divergence, beta=beta, labels=labels, alpha=alpha,
            label_smoothing=label_smoothing, ignore_index=ignore_index, scale_by_t2=scale_by_t2, reduction=reduction,
            num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
            chunk_size=chunk_size, backend=backend, entropy=False, group=group)[0]
    except (TypeError, ValueError) as error:
        if group is not None:  # at the group's first call every rank hears of a refusal (distributed.refuse)
            from lepton_fast import distributed

            distributed.refuse(group, error)
        raise


def _linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, *, student_bias,
               teacher_bias, divergence, beta, labels, alpha, label_smoothing, ignore_index, scale_by_t2, reduction,
               num_items_in_batch, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap,
               teacher_softcap, chunk_size, backend, entropy: bool, group=None) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`fused_linear_kd_loss` (every argument given) -> (loss, the sum of the student's
    entropy of softmax(z_s / T) over the rows that count, no gradient, when ``entropy``; else
    None), on every backend."""
    student_hidden, student_weight = _autocast(student_hidden, student_weight)
    teacher_hidden, teacher_weight = _autocast(teacher_hidden, teacher_weight)
    _validate.lm_head("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias,
                     empty_ok=group is not None)
    _validate.lm_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias,
                     empty_ok=group is not None)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but student_hidden "
                         f"has {tuple(student_hidden.shape[:-1])}: one row of each per token")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on "
                         f"{student_hidden.device}")
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student_weight has V={v_s} rows but teacher_weight has V_t={v_t}: pass vocab_size=<the shared "
                "vocabulary> to cut both heads to it (padding the shorter head with zeros would put probability "
                "mass on the padded classes)")
        vocab_size = v_s
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(f"vocab_size must be an int in [1, min(V, V_t)] = [1, {min(v_s, v_t)}] (student_weight "
                         f"has V={v_s}, teacher_weight V_t={v_t}), got {vocab_size!r}")
    o = _validate.kd_options(temperature, divergence, beta, alpha, label_smoothing, reduction, num_items_in_batch,
                             labels, "student_hidden", student_hidden)
    s_scale = _validate.model_constant("student_logit_scale", student_logit_scale)
    t_scale = _validate.model_constant("teacher_logit_scale", teacher_logit_scale)
    s_cap = (None if student_softcap is None
             else _validate.model_constant("student_softcap", student_softcap, positive=True))
    t_cap = (None if teacher_softcap is None
             else _validate.model_constant("teacher_softcap", teacher_softcap, positive=True))
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = student_hidden.shape[:-1]

    chosen = _backend.resolve(KD_SPEC, student_hidden.device, backend)
    split = None
    if group is not None:
        refused = [what for what, given in (
            ("reduction 'none'", reduction == "none"), ("vocab_size", vocab_size != v_s),
            ("torch.compile", torch.compiler.is_compiling()),
            ("the entropy", entropy)) if given]
        if refused:
            raise ValueError(f"fused_linear_kd_loss with group=: not with {refused[0]} (see the docstring)")
        from lepton_fast import distributed

        split = distributed.vocab_split(group, v_s, student_hidden.device, _backend.resolve(kd_loss.SLICE_SPEC,
                                                                                            student_hidden.device,
                                                                                            backend))
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    grad_on = torch.is_grad_enabled()
    # "none": the gradient depends on the per-row grad_output, so the backward computes it.
    needs = [grad_on and reduction != "none" and t is not None and t.requires_grad
             for t in (student_hidden, student_weight, student_bias)]
    acc = torch.promote_types(torch.promote_types(h_s.dtype, h_t.dtype), torch.float32)
    if chunk_size is None:  # with a group, from the whole vocabulary: every rank must cut the same chunks
        chunk_size = _auto_chunk_size(h_s.shape[0], vocab_size if split is None else split.n_classes, acc,
                                      student_weight.dtype, h_s.device)
    args = (h_s, student_weight, h_t, teacher_weight.detach(), student_bias,
            None if teacher_bias is None else teacher_bias.detach(), o.labels, o.temperature, o.beta, o.alpha,
            o.label_smoothing, divergence, ignore_index, scale_by_t2, reduction, o.num_items, vocab_size, s_scale,
            t_scale, s_cap, t_cap, chunk_size, None, *needs, entropy)
    token = None if split is None else _VOCAB_SPLIT.set(split)  # (torch.compile cannot trace a set)
    try:
        with _backend.running(KD_SPEC, chosen, h_s.device.type):
            out = _fused_linear_kd_loss(*args)
    finally:
        if token is not None:
            _VOCAB_SPLIT.reset(token)
    loss = out[0].reshape(lead) if reduction == "none" else out[0]
    return loss, (out[4] if entropy else None)
