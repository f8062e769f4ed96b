"""fused_linear_kd_loss: distillation through both lm_heads, the [N, V] logits never materialised.

Mechanism. The rows are cut into chunks; for each chunk two GEMMs give the student's and the
teacher's logits in float32, the fused row kernel of ``fused_kd_loss`` (the same op, on every
device: CPU C++, CUDA C++, Triton) gives the chunk's loss and d(loss)/d(logits) in one pass,
and two more GEMMs turn that gradient into the chunk's rows of d(loss)/d(student_hidden) and
its contribution to d(loss)/d(student_weight) (accumulated in float32). The whole loop is one
``torch.library.custom_op`` (``lepton_fast::fused_linear_kd_loss``) with one autograd formula,
so torch.compile sees a single opaque op and the backward only scales the gradients the
forward wrote.

fused_linear_sparse_kd_loss is the same loop (``_student_head_loop``) with a teacher stored as
its top-k log-probabilities: no teacher GEMM, and the row kernel is ``sparse_kd_loss`` on the
chunk's logits and the chunk's rows of the teacher's entries (its own custom op,
``lepton_fast::fused_linear_sparse_kd_loss``, with the same autograd formula).

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
import re
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
from torch import Tensor

from lepton_fast import _backend, _validate
from lepton_fast.ops import _autograd, kd_loss
from lepton_fast.ops.kd_loss import SPEC as KD_SPEC
from lepton_fast.ops.sparse_kd_loss import SPEC as SPARSE_SPEC
from lepton_fast.ops.sparse_kd_loss import SLICE_GRAD_SPEC, TRUNCATIONS

if TYPE_CHECKING:
    from typing import Unpack

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


def _auto_chunk_size(n_rows: int, vocab: int, acc: torch.dtype, weight_dtype: torch.dtype, device,
                     buffers: int = 3) -> int:
    """Rows per chunk that keep ``buffers`` float32 (acc) [rows, vocab] buffers (the logits of
    each head, the row gradient) and, for a low-precision head on a GPU, the gradient rounded
    for the GEMMs under the device's CHUNK_BUDGET_BYTES."""
    per_row = vocab * (buffers * acc.itemsize)
    if weight_dtype != acc and device.type != "cpu":
        per_row += vocab * weight_dtype.itemsize  # the gradient rounded for the GEMMs
    rows = CHUNK_BUDGET_BYTES["cpu" if device.type == "cpu" else "other"] // per_row
    if rows >= 128:
        rows -= rows % 64  # whole GEMM tiles on a GPU
    return max(1, min(n_rows, rows))


def _widened(weight: Tensor, acc: torch.dtype) -> Tensor:
    """A head's weight as its GEMMs take it: the GPU multiplies bfloat16/float16 with float32
    output; the CPU has no such GEMM, so there (and for any other pair of dtypes) the head is
    widened to the accumulation dtype once per call (what TRL's chunked loss does off the GPU
    too). The hidden states follow the weight's dtype, chunk by chunk."""
    if weight.device.type == "cpu" or weight.dtype not in _LOW_PRECISION or acc != torch.float32:
        return weight.to(acc)
    return weight


# A row kernel checks what it reads (labels, teacher_indices, undefined rows) and says so in
# its own terms: its op's name first, and the row within the chunk it was given.
_KERNEL_NAME = re.compile(r"^(?:fused_kd_loss|sparse_kd_loss|kd_slice_\w+|sparse_slice\w*): ")
_ROW = re.compile(r"\brow (\d+)")
# The logits the kernel was given are the caller's products (a row of them NaN or all -inf).
_LOGITS = {"student_logits": "student_hidden @ student_weight.T", "teacher_logits": "teacher_hidden @ teacher_weight.T"}


def _in_the_callers_terms(error: ValueError, public_name: str, start: int, index: Optional[Tensor]) -> ValueError:
    """The row kernel's ``error`` on the chunk from row ``start`` (or of rows ``index``, on the
    CPU where ignored rows are left out) as the caller of ``public_name`` should read it: that
    op's name in place of the kernel's, each row its row in the caller's (flattened) batch, and
    the logits the products they came from.
    The check itself stays the kernel's, its one source of truth."""
    def callers_row(m: re.Match) -> str:
        i = int(m.group(1))
        return f"row {start + i if index is None else int(index[i])}"

    message = _ROW.sub(callers_row, _KERNEL_NAME.sub("", str(error), count=1))
    for name, product in _LOGITS.items():
        message = re.sub(rf"\b{name}\b", product, message)
    return ValueError(f"{public_name}: {message}")


def _student_head_loop(public_name: str, student_hidden: Tensor, student_weight: Tensor,
                       student_bias: Optional[Tensor], labels: Optional[Tensor], row_loss, *, acc: torch.dtype,
                       ignore_index: int, reduction: str, num_items_in_batch: Optional[Tensor], vocab_size: int,
                       logit_scale: float, softcap: Optional[float], chunk_size: int, row_weights: Optional[Tensor],
                       grad_hidden: bool, grad_weight: bool, grad_bias: bool,
                       entropy_inv_temperature: Optional[float] = None, group=None):
    """The chunk loop of every fused-linear loss: per chunk of rows the student's logits out of
    the GEMM in ``acc``, ``row_loss`` for the chunk's loss and d(loss)/d(logits), then the
    chunk's rows of d(loss)/d(student_hidden) and its share of d(loss)/d(student_weight, bias).

    ``row_loss(take, z_s, labels, reduction, divisor, compute_grad) -> (loss, grad)`` is the row
    kernel with the teacher: ``take`` maps a tensor with one row per token ([N, ...]) to the
    chunk's rows, ``z_s`` is the chunk's [rows, vocab_size] logits, ``reduction`` is "none" or
    "sum" (the sum and the gradient divided by ``divisor`` when it is given).

    With a process ``group`` (the weight a rank's slice of a vocabulary-parallel head), every
    slice's part of d(loss)/d(student_hidden) is all-reduced over it at the end.

    A ValueError of the row kernel (a label or teacher index out of range, a row whose softmax
    is undefined) is raised again naming ``public_name``, the op the caller called, and the
    caller's row.

    Returns (loss, d hidden, d weight, d bias, entropy sum), as the ops' outputs: a gradient
    not asked for, and the entropy without ``entropy_inv_temperature``, as empty tensors."""
    device, n = student_hidden.device, student_hidden.shape[0]
    empty = lambda: student_hidden.new_empty((0,))  # noqa: E731  (outputs must not alias each other)
    ws = _widened(student_weight[:vocab_size], acc)
    bs = None if student_bias is None else student_bias[:vocab_size].to(acc)

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
    entropy = entropy_inv_temperature is not None
    entropy_sum = torch.zeros((), dtype=acc, device=device) if entropy else empty()
    compute_grad = grad_hidden or grad_weight or grad_bias

    chunk = min(chunk_size, max(n_rows, 1))
    buf_s = torch.empty((chunk, vocab_size), dtype=acc, device=device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        if rows is None:
            index, take = None, (lambda x: x[start:end])
        else:
            index = rows[start:end]
            take = lambda x: x.index_select(0, index)  # noqa: E731
        h_s = take(student_hidden).to(ws.dtype)
        z_s = _project(h_s, ws, bs, logit_scale, softcap, buf_s[: end - start])
        grad = None  # the last chunk's [chunk, V] gradient, freed before row_loss allocates this one's
        try:
            part, grad = row_loss(take, z_s, None if labels is None else take(labels), kd_reduction, divisor,
                                  compute_grad)
        except ValueError as error:
            raise _in_the_callers_terms(error, public_name, start, index) from error
        if entropy:
            rows_entropy = _entropy_rows(z_s, entropy_inv_temperature)
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
        grad = _grad_through_head(grad, z_s, logit_scale, softcap)
        if grad_bias:
            acc_bias += grad.sum(0)
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
    if group is not None and grad_hidden:
        torch.distributed.all_reduce(d_hidden, group=group)
    return loss, d_hidden, d_weight, d_bias, entropy_sum


@torch.library.custom_op("lepton_fast::fused_linear_kd_loss", mutates_args=())
def _fused_linear_kd_loss(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    student_bias: Optional[Tensor], teacher_bias: Optional[Tensor], labels: Optional[Tensor], hyper: Tensor,
    ignore_index: int, reduction: str, num_items_in_batch: Optional[Tensor], vocab_size: int,
    student_logit_scale: float, teacher_logit_scale: float, student_softcap: Optional[float],
    teacher_softcap: Optional[float], chunk_size: int, row_weights: Optional[Tensor], grad_hidden: bool,
    grad_weight: bool, grad_bias: bool, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[N, H_s], [V_s, H_s], [N, H_t], [V_t, H_t] -> (loss, d/d student_hidden, d/d student_weight,
    d/d student_bias, sum of the student's entropy over the rows that count). A gradient not
    asked for, and the entropy when ``entropy`` is False, come back as empty tensors.

    reduction "none" with ``row_weights`` [N] gives the gradient of sum(row_weights * loss)
    (its backward); "mean" divides by ``num_items_in_batch`` or the count of valid rows."""
    acc = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
    wt = _widened(teacher_weight[:vocab_size], acc)
    bt = None if teacher_bias is None else teacher_bias[:vocab_size].to(acc)
    split = _VOCAB_SPLIT.get()
    buf_t = None  # the teacher's logits, as long as the first (longest) chunk

    def row_loss(take, z_s, chunk_labels, kd_reduction, divisor, compute_grad):
        nonlocal buf_t
        if buf_t is None:
            buf_t = torch.empty_like(z_s)
        z_t = _project(take(teacher_hidden).to(wt.dtype), wt, bt, teacher_logit_scale, teacher_softcap,
                       buf_t[: z_s.shape[0]])
        if split is None:
            return torch.ops.lepton_fast.fused_kd_loss.default(
                z_s, z_t, chunk_labels, hyper, ignore_index, kd_reduction, divisor, compute_grad)
        from lepton_fast import distributed

        a = kd_loss.KDArgs(z_s, z_t, chunk_labels, z_s.shape[:-1], hyper, ignore_index, kd_reduction, divisor,
                           compute_grad)
        return distributed.chunk_loss_and_grad(split, a)

    return _student_head_loop(
        "fused_linear_kd_loss", student_hidden, student_weight, student_bias, labels, row_loss, acc=acc,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
        logit_scale=student_logit_scale, softcap=student_softcap, chunk_size=chunk_size, row_weights=row_weights,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias,
        entropy_inv_temperature=1.0 / _validate.kd_values(hyper)["temperature"] if entropy else None,
        group=None if split is None else split.group)


def _fake_outputs(student_hidden, student_weight, student_bias, acc, reduction, grad_hidden, grad_weight,
                  grad_bias) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fake kernels' (loss, d hidden, d weight, d bias)."""
    empty = lambda: student_hidden.new_empty((0,))  # noqa: E731
    loss = student_hidden.new_empty((student_hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    return (loss, torch.empty_like(student_hidden) if grad_hidden else empty(),
            torch.empty_like(student_weight) if grad_weight else empty(),
            torch.empty_like(student_bias) if grad_bias else empty())


@_fused_linear_kd_loss.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, labels, hyper,
      ignore_index, reduction, num_items_in_batch, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
      chunk_size, row_weights, grad_hidden, grad_weight, grad_bias, entropy):
    acc = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
    return (*_fake_outputs(student_hidden, student_weight, student_bias, acc, reduction, grad_hidden, grad_weight,
                           grad_bias),
            student_hidden.new_empty((), dtype=acc) if entropy else student_hidden.new_empty((0,)))


@torch.library.custom_op("lepton_fast::fused_linear_sparse_kd_loss", mutates_args=())
def _fused_linear_sparse_kd_loss(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_indices: Tensor,
    teacher_logprobs: Tensor, teacher_mask: Optional[Tensor], labels: Optional[Tensor], hyper: Tensor,
    truncation: str, ignore_index: int, reduction: str, num_items_in_batch: Optional[Tensor], vocab_size: int,
    student_logit_scale: float, student_softcap: Optional[float], chunk_size: int, row_weights: Optional[Tensor],
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[N, H], [V, H], [V] or None, [N, K] int64, [N, K], [N, K] bool or None -> (loss,
    d/d student_hidden, d/d student_weight, d/d student_bias), a gradient not asked for as an
    empty tensor; ``row_weights``, the reductions and the vocabulary split (``_VOCAB_SPLIT``) as
    in ``fused_linear_kd_loss``'s op. The row kernel is ``sparse_kd_loss`` on each chunk's
    logits and teacher entries (with a split, lepton_fast.distributed's sparse slice ops)."""
    split = _VOCAB_SPLIT.get()

    def row_loss(take, z_s, chunk_labels, kd_reduction, divisor, compute_grad):
        indices, logprobs = take(teacher_indices), take(teacher_logprobs)
        mask = None if teacher_mask is None else take(teacher_mask)
        if split is None:
            return torch.ops.lepton_fast.sparse_kd_loss.default(
                z_s, indices, logprobs, mask, chunk_labels, hyper, truncation, ignore_index, kd_reduction, divisor,
                compute_grad)
        from lepton_fast import distributed

        o = _validate.KDOptions(hyper, chunk_labels, ignore_index, kd_reduction, divisor)
        return distributed.sparse_chunk_loss_and_grad(split, z_s, indices, logprobs, mask, o, truncation,
                                                      compute_grad)

    return _student_head_loop(
        "fused_linear_sparse_kd_loss", student_hidden, student_weight, student_bias, labels, row_loss,
        acc=torch.promote_types(student_hidden.dtype, torch.float32), ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, logit_scale=student_logit_scale,
        softcap=student_softcap, chunk_size=chunk_size, row_weights=row_weights, grad_hidden=grad_hidden,
        grad_weight=grad_weight, grad_bias=grad_bias, group=None if split is None else split.group)[:4]


@_fused_linear_sparse_kd_loss.register_fake
def _(student_hidden, student_weight, student_bias, teacher_indices, teacher_logprobs, teacher_mask, labels, hyper,
      truncation, ignore_index, reduction, num_items_in_batch, vocab_size, student_logit_scale, student_softcap, chunk_size, row_weights, grad_hidden,
      grad_weight, grad_bias):
    return _fake_outputs(student_hidden, student_weight, student_bias,
                         torch.promote_types(student_hidden.dtype, torch.float32), reduction, grad_hidden,
                         grad_weight, grad_bias)


_GRAD_FLAGS = {"student_hidden": "grad_hidden", "student_weight": "grad_weight", "student_bias": "grad_bias"}


def _register_autograd(op, public_name: str) -> None:
    """The autograd formula of a fused-linear op, whose outputs are (loss, d hidden, d weight,
    d bias, ...): the backward scales the gradients the forward wrote by grad_output, or for
    reduction "none" (whose gradient depends on the per-row grad_output) runs the op again with
    grad_output as its ``row_weights``. Arguments are found by their names in the schema."""
    names = [a.name for a in op._opoverload._schema.arguments]
    at = {name: i for i, name in enumerate(names)}
    differentiable = {at[name]: flag for name, flag in _GRAD_FLAGS.items()}  # input position -> output flag

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.reduction = inputs[at["reduction"]]
        ctx.computed = [inputs[at[flag]] for flag in differentiable.values()]  # the gradients the forward wrote
        ctx.used = False
        if ctx.reduction == "none":
            ctx.inputs = inputs
        else:
            ctx.save_for_backward(*output[1:4])

    def backward(ctx, grad_loss, *_):
        _autograd.check_backward(ctx, public_name)
        grads = [None] * len(names)
        if grad_loss is None:
            return tuple(grads)
        if ctx.reduction == "none":
            args = list(ctx.inputs)
            args[at["row_weights"]] = grad_loss.reshape(-1)
            if "entropy" in at:
                args[at["entropy"]] = False
            for position, flag in differentiable.items():
                args[at[flag]] = ctx.needs_input_grad[position]
            saved = op(*args)[1:4]
        else:
            saved = ctx.saved_tensors
        for (position, flag), grad, computed in zip(differentiable.items(), saved, ctx.computed):
            if not ctx.needs_input_grad[position]:
                continue
            if ctx.reduction != "none" and not computed:  # (the flag: a rank's empty bias slice has an empty grad)
                raise RuntimeError(f"{public_name}: the forward ran with {flag}=False, so it has no gradient for an "
                                   "input that requires one")
            # Recomputed with grad_output already in it, or scaled by it now.
            grads[position] = grad if ctx.reduction == "none" else _autograd.times(grad, grad_loss)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(_fused_linear_kd_loss, "fused_linear_kd_loss")
_register_autograd(_fused_linear_sparse_kd_loss, "fused_linear_sparse_kd_loss")


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


class _Head(NamedTuple):
    """One model's lm_head as the fused-linear ops take it, checked (:func:`_checked_head`)."""

    hidden: Tensor  # [..., H], after autocast's cast
    weight: Tensor  # [V, H], the same dtype
    bias: Optional[Tensor]
    scale: float
    softcap: Optional[float]


def _checked_head(model: str, hidden, weight, bias, logit_scale, softcap, *, empty_ok: bool = False) -> _Head:
    """``model``'s ("student" or "teacher") hidden states, lm_head and logit constants, autocast
    applied and checked; errors name the arguments (``student_hidden``, ``teacher_softcap``, ...)."""
    hidden, weight = _autocast(hidden, weight)
    _validate.lm_head(f"{model}_hidden", hidden, f"{model}_weight", weight, f"{model}_bias", bias, empty_ok=empty_ok)
    scale = _validate.model_constant(f"{model}_logit_scale", logit_scale)
    cap = None if softcap is None else _validate.model_constant(f"{model}_softcap", softcap, positive=True)
    return _Head(hidden, weight, bias, scale, cap)


def _checked_vocab_size(vocab_size, v_s: int, v_t: Optional[int] = None) -> int:
    """The classes the loss runs over: the first ``vocab_size`` rows of the student's head (and
    the teacher's, V_t rows, when there is one); None is V (the caller checks V == V_t)."""
    if vocab_size is None:
        return v_s
    limit, heads = (v_s, f"V] = [1, {v_s}] (student_weight has V={v_s})") if v_t is None else (
        min(v_s, v_t), f"min(V, V_t)] = [1, {min(v_s, v_t)}] (student_weight has V={v_s}, teacher_weight V_t={v_t})")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= limit:
        raise ValueError(f"vocab_size must be an int in [1, {heads}, got {vocab_size!r}")
    return vocab_size


def _checked_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _vocab_split(public_name: str, group, slice_spec, backend: Optional[str], weight: Tensor, *, reduction: str,
                 vocab_size: int, entropy: bool = False):
    """None without a ``group``; else this rank's lepton_fast.distributed.VocabSplit of the
    vocabulary for a head whose slice is ``weight`` [V_r, H], after refusing what the
    vocabulary-parallel loop does not do, and the backend of the slice ops (``slice_spec``)."""
    if group is None:
        return None
    refused = [what for what, given in (
        ("reduction 'none'", reduction == "none"), ("vocab_size", vocab_size != weight.shape[0]),
        ("torch.compile", torch.compiler.is_compiling()), ("the entropy", entropy)) if given]
    if refused:
        raise ValueError(f"{public_name} with group=: not with {refused[0]} (see the docstring)")
    from lepton_fast import distributed

    return distributed.vocab_split(group, weight.shape[0], weight.device,
                                   _backend.resolve(slice_spec, weight.device, backend))


def _split_call(split, op, *args):
    """``op(*args)`` with ``_VOCAB_SPLIT`` set to ``split`` while it runs (torch.compile cannot
    trace a ContextVar.set: the group refuses it, and without one nothing is set)."""
    if split is None:
        return op(*args)
    token = _VOCAB_SPLIT.set(split)
    try:
        return op(*args)
    finally:
        _VOCAB_SPLIT.reset(token)


def _tell_the_group(group, error: Exception) -> None:
    """A refusal at a group's first call reaches every rank (lepton_fast.distributed.refuse)."""
    if group is not None:
        from lepton_fast import distributed

        distributed.refuse(group, error)


def _grads_to_write(reduction: str, student: _Head) -> list[bool]:
    """grad_hidden, grad_weight, grad_bias: the student's gradients the forward writes. None for
    reduction "none", whose gradient depends on the per-row grad_output: the backward computes it."""
    on = torch.is_grad_enabled() and reduction != "none"
    return [on and t is not None and t.requires_grad for t in (student.hidden, student.weight, student.bias)]

@_validate.kd_keywords(labels="""
    Here labels are [...] class ids < vocab size and the hard-label CE uses the student's
    logits at T=1. Rows labelled ``ignore_index`` cost nothing on the CPU (left out before
    the GEMMs) and need no host synchronisation anywhere.""")
def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    temperature: Scalar = 1.0,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    vocab_size: Optional[int] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    group=None,
    **kd: Unpack[_validate.KDKeywords],
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
        KD_KEYWORDS
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
        RuntimeError: a forced backend that cannot run here; ``group`` without torch.distributed
            initialised; a second backward through one graph, or a second-order gradient
            (differentiate :func:`lepton_fast.reference.fused_linear_kd_loss` for those).

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
            teacher_bias=teacher_bias, vocab_size=vocab_size, student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
            chunk_size=chunk_size, backend=backend, entropy=False, group=group, **kd)[0]
    except (TypeError, ValueError) as error:
        _tell_the_group(group, error)
        raise


def _linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, *, student_bias,
               teacher_bias, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
               chunk_size, backend, entropy: bool, group=None, **kd) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`fused_linear_kd_loss` (every argument given but the KD keywords ``kd``) -> (loss, the sum of the student's
    entropy of softmax(z_s / T) over the rows that count, no gradient, when ``entropy``; else
    None), on every backend."""
    s = _checked_head("student", student_hidden, student_weight, student_bias, student_logit_scale, student_softcap,
                      empty_ok=group is not None)
    t = _checked_head("teacher", teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap,
                      empty_ok=group is not None)
    if t.hidden.shape[:-1] != s.hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden has leading shape {tuple(t.hidden.shape[:-1])} but student_hidden "
                         f"has {tuple(s.hidden.shape[:-1])}: one row of each per token")
    if t.hidden.device != s.hidden.device:
        raise ValueError(f"teacher_hidden is on {t.hidden.device} but student_hidden is on {s.hidden.device}")
    v_s, v_t = s.weight.shape[0], t.weight.shape[0]
    if vocab_size is None and v_s != v_t:
        raise ValueError(
            f"student_weight has V={v_s} rows but teacher_weight has V_t={v_t}: pass vocab_size=<the shared "
            "vocabulary> to cut both heads to it (padding the shorter head with zeros would put probability "
            "mass on the padded classes)")
    vocab_size = _checked_vocab_size(vocab_size, v_s, v_t)
    o = _validate.kd_options("fused_linear_kd_loss", "student_hidden", s.hidden, temperature=temperature, **kd)
    reduction = o.reduction
    _checked_chunk_size(chunk_size)
    chosen = _backend.resolve(KD_SPEC, s.hidden.device, backend)
    split = _vocab_split("fused_linear_kd_loss", group, kd_loss.SLICE_SPEC, backend, s.weight, reduction=reduction,
                         vocab_size=vocab_size, entropy=entropy)
    h_s = s.hidden.reshape(-1, s.hidden.shape[-1])
    h_t = t.hidden.detach().reshape(-1, t.hidden.shape[-1])
    acc = torch.promote_types(torch.promote_types(h_s.dtype, h_t.dtype), torch.float32)
    if chunk_size is None:  # with a group, from the whole vocabulary: every rank must cut the same chunks
        chunk_size = _auto_chunk_size(h_s.shape[0], vocab_size if split is None else split.n_classes, acc,
                                      s.weight.dtype, h_s.device)
    args = (h_s, s.weight, h_t, t.weight.detach(), s.bias, None if t.bias is None else t.bias.detach(), o.labels,
            o.hyper, o.ignore_index, reduction, o.num_items, vocab_size, s.scale, t.scale, s.softcap, t.softcap,
            chunk_size, None, *_grads_to_write(reduction, s), entropy)
    with _backend.running(KD_SPEC, chosen, h_s.device.type):
        out = _split_call(split, _fused_linear_kd_loss, *args)
    loss = out[0].reshape(s.hidden.shape[:-1]) if reduction == "none" else out[0]
    return loss, (out[4] if entropy else None)


@_validate.kd_keywords(labels="""
    Here labels are [...] class ids < vocab_size. Rows labelled ``ignore_index`` cost
    nothing on the CPU (left out before the GEMMs) and need no host synchronisation
    anywhere.""")
def fused_linear_sparse_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_mask: Optional[Tensor] = None,
    temperature: Scalar = 1.0,
    *,
    student_bias: Optional[Tensor] = None,
    truncation: str = "renormalize",
    vocab_size: Optional[int] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    group=None,
    **kd: Unpack[_validate.KDKeywords],
) -> Tensor:
    r"""Distillation from a teacher's stored top-k log-probabilities through the student's
    lm_head, the [N, V] logits never materialised.

    Exactly :func:`lepton_fast.sparse_kd_loss` ``(z, teacher_indices, teacher_logprobs,
    teacher_mask, temperature, ...)`` with the student's logits

    .. math:: z = c \tanh\big(\mathrm{scale}\,(h W^\top + b) / c\big)

    (the tanh only when the softcap c is given; neither gives the plain ``h @ W.T + b``), so
    the buckets, truncations, temperature and the entries that count are as it documents them
    (``reference.sparse_buckets``). The rows are processed in chunks as in
    :func:`lepton_fast.fused_linear_kd_loss`: per chunk the student's logits come out of the
    GEMM in float32, the ``sparse_kd_loss`` row kernel reads each row once for the loss and
    d(loss)/d(z), and the gradients of ``student_hidden``, ``student_weight`` and
    ``student_bias`` are computed during the forward (the weight's and bias's accumulated in
    float32); the backward only scales them. There is no teacher head: three GEMMs in all.

    Args:
        student_hidden: [..., H] float32, bfloat16, float16 or float64, the student's final
            hidden states. Gradient flows here.
        student_weight: [V, H], the student's lm_head weight, same dtype. Gradient flows here.
        teacher_indices: [..., K] integer class ids in [0, vocab_size) (K >= 1), same leading dims.
        teacher_logprobs: [..., K] floating log-probabilities of the teacher at T = 1; a constant.
            Log-probabilities (<= 0, from ``log_softmax``), not probabilities or raw logits, as
            :func:`lepton_fast.sparse_kd_loss` says: the values are not checked.
        teacher_mask: optional [..., K] bool (or 0/1 integer): False = entry not provided.
        temperature: T > 0, documented range 1e-8 <= T <= 1e4 (a float or a 0-d CPU tensor, as are
            beta, alpha, label_smoothing).
        student_bias: optional [V] lm_head bias; it gets a gradient.
        KD_KEYWORDS
        truncation: as in :func:`lepton_fast.sparse_kd_loss`.
        vocab_size: the classes are the head's first ``vocab_size`` rows (a head padded beyond
            the tokenizer's vocabulary, whose padded rows must take no probability mass in the
            ``"tail"`` bucket); those beyond get zero gradient. None: all V.
        student_logit_scale: a finite multiplier of the logits, before the softcap.
        student_softcap: None, or c > 0 for the tanh soft-capping.
        chunk_size: rows per chunk (> 0). None: as many as keep the chunk's float32 logits and
            row gradient (8 bytes x V per row) under 256 MiB on the CPU, 1 GiB on a GPU. The
            result does not depend on it beyond float32 rounding.
        backend: the row kernel, as in :func:`lepton_fast.sparse_kd_loss`; forcing one is
            eager-only and applies to the forward (with reduction "none" the backward
            recomputes the gradients with the default kernel). With ``group``, the backend of
            the sparse slice ops.
        group: a torch.distributed process group whose ranks split the vocabulary, or None
            for one device, as for :func:`lepton_fast.fused_linear_kd_loss`: each rank passes
            its contiguous [V_r, H] slice of the weight (and of the bias), in rank order;
            hidden states, the teacher's entries (global class ids) and labels are the same on
            every rank, as is ``chunk_size``. Every rank gets the loss of the whole vocabulary,
            the gradient of its weight and bias slices and the hidden states' gradient
            all-reduced over the group. Per chunk the rows take the all-reduces of
            :func:`lepton_fast.distributed.vocab_parallel_sparse_kd_loss` (O(rows x K)
            elements), plus one of [N, H] at the end; the backward none. Eager only; not
            with reduction "none" or ``vocab_size``. A refusal at the group's first call
            stops every rank, as for :func:`lepton_fast.distributed.vocab_parallel_sparse_kd_loss`.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for ``"none"``.

    Raises:
        TypeError: non-tensor or non-floating hidden states or weight, a weight of another
            dtype than the hidden states, non-integer indices or labels, non-floating logprobs,
            a mask neither bool nor integer, a hyper-parameter that is not a number.
        ValueError: mismatched shapes or devices, K = 0, ``vocab_size`` outside [1, V], a
            non-positive chunk_size or softcap, a non-finite logit scale, unknown
            divergence/truncation/reduction, and everything :func:`sparse_kd_loss` refuses
            (an index that counts outside [0, vocab_size), named ``teacher_indices``; labels
            out of range; a row whose buckets are undefined).
        RuntimeError: a forced backend that cannot run here; ``group`` without torch.distributed
            initialised; a second backward through one graph, or a second-order gradient
            (differentiate :func:`lepton_fast.reference.fused_linear_sparse_kd_loss` for those).

    Autocast: as :func:`lepton_fast.fused_linear_kd_loss`: the hidden states and weight are
    cast to autocast's dtype first, as ``F.linear`` would (a bfloat16 hidden state with a
    float32 lm_head works; the float32 weight gets its gradient through the cast).

    Memory: the chunk's buffers, the float32 weight-gradient accumulator when the weight is
    not float32 ([V, H]), and the gradients; no buffer of N x V elements. Time: the three
    GEMMs (logits, d hidden, d weight: 6·N·H·V flops) plus the row kernel.

    Sources: axolotl's chunked top-k KD over Liger's fused-linear distillation base
    (``integrations/kd/kernels/liger.py``), without its per-chunk ``torch.func`` and host
    synchronisation; the buckets as :func:`lepton_fast.sparse_kd_loss` cites them.
    """
    try:
        s = _checked_head("student", student_hidden, student_weight, student_bias, student_logit_scale,
                          student_softcap, empty_ok=group is not None)
        indices, logprobs, mask = _validate.sparse_teacher(teacher_indices, teacher_logprobs, teacher_mask,
                                                           "student_hidden", s.hidden)
        _validate.choice("truncation", truncation, TRUNCATIONS)
        o = _validate.kd_options("fused_linear_sparse_kd_loss", "student_hidden", s.hidden,
                                 temperature=temperature, **kd)
        vocab_size = _checked_vocab_size(vocab_size, s.weight.shape[0])
        _checked_chunk_size(chunk_size)
        chosen = _backend.resolve(SPARSE_SPEC, s.hidden.device, backend)
        split = _vocab_split("fused_linear_sparse_kd_loss", group, SLICE_GRAD_SPEC, backend, s.weight,
                             reduction=o.reduction, vocab_size=vocab_size)
    except (TypeError, ValueError) as error:
        _tell_the_group(group, error)
        raise
    h = s.hidden.reshape(-1, s.hidden.shape[-1])
    if chunk_size is None:  # the student's logits and the row gradient: two float32 buffers per row (with a
        # group, from the whole vocabulary: every rank must cut the same chunks)
        chunk_size = _auto_chunk_size(h.shape[0], vocab_size if split is None else split.n_classes,
                                      torch.promote_types(h.dtype, torch.float32), s.weight.dtype, h.device, buffers=2)
    with _backend.running(SPARSE_SPEC, chosen, h.device.type):
        loss = _split_call(
            split, _fused_linear_sparse_kd_loss, h, s.weight, s.bias, indices, logprobs, mask, o.labels, o.hyper,
            truncation, o.ignore_index, o.reduction, o.num_items, vocab_size, s.scale, s.softcap, chunk_size, None,
            *_grads_to_write(o.reduction, s))[0]
    return loss.reshape(s.hidden.shape[:-1]) if o.reduction == "none" else loss
