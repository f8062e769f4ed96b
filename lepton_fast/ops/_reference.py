"""The reference kernels: every op's schema over lepton_fast.reference, the float-argument
oracle of the tests.

They run where no compiled kernel holds the device key (CPU tensors of a pure-Python install),
and wherever ``backend="reference"`` is forced (lepton_fast._backend). Each is a thin adapter:
the schema's hyper-parameter tensors become floats (the KD ops' packed ones by
``hyper_keywords``), a gradient the schema returns is the
oracle's autograd gradient, and the data checks the compiled kernels make where they read the
data (labels in range, rows whose softmax is undefined, a perturbation's box and range) are
made here, once, on the oracle's answer.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor

from lepton_fast import _validate, reference
from lepton_fast.ops.adversarial import BOX_FIX, opmath

_KEY = torch._C.DispatchKey
# A kernel runs below the autograd keys; the oracle's gradient needs them back on.
_AUTOGRAD_KEYS = (_KEY.AutogradFunctionality, _KEY.AutogradOther, _KEY.AutogradNestedTensor, _KEY.ADInplaceOrView)


@contextlib.contextmanager
def autograd_on():
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _reduced(rows_of, labels: Optional[Tensor], ignore_index: int, reduction: str, num_items_in_batch):
    """x -> (the loss of x reduced as the op's arguments say, its rows): a KD op's loss from
    ``rows_of(x)`` [N] (the reference with reduction "none"), so that the data check can name
    the row a NaN comes from."""
    def loss_and_rows(x: Tensor):
        rows = rows_of(x)
        divisor = reference.mean_divisor(labels, ignore_index, rows.shape[0])
        return reference.reduce_rows(rows, reduction, divisor, num_items_in_batch), rows
    return loss_and_rows


def _with_grad(loss_of, x: Tensor, compute_grad: bool):
    """(loss_of(x), d(loss_of(x).sum())/dx, or an empty tensor unless compute_grad). The rows
    are independent, so for a per-row loss that is each row's own gradient."""
    if not compute_grad:
        with torch.no_grad():
            out = loss_of(x)
        return out, x.new_empty((0,))
    with autograd_on():
        leaf = x.detach().requires_grad_()
        out = loss_of(leaf)
        loss = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad(loss.sum(), leaf, allow_unused=True, materialize_grads=True)
    return (tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()), grad


_TAKES: dict = {}  # a reference function -> the names of its parameters


def hyper_keywords(fn, hyper: Tensor) -> dict:
    """The KD ops' packed hyper-parameters (_validate.KD_FIELDS) as the keywords of the
    reference function ``fn`` that take them: a new field reaches every function that names
    it, and no adapter changes."""
    takes = _TAKES.get(fn)
    if takes is None:
        takes = _TAKES[fn] = frozenset(inspect.signature(fn).parameters)
    return {name: value for name, value in _validate.kd_values(hyper).items() if name in takes}


# --- knowledge distillation ---------------------------------------------------------------------


def fused_kd_loss(student_logits, teacher_logits, labels, hyper, ignore_index, reduction, num_items_in_batch,
                  compute_grad):
    if labels is not None:
        _validate.labels_in_range("fused_kd_loss", labels, student_logits.shape[-1], ignore_index)
    (loss, rows), grad = _with_grad(_reduced(lambda s: reference.fused_kd_loss(
        s, teacher_logits, labels=labels, ignore_index=ignore_index, reduction="none",
        **hyper_keywords(reference.fused_kd_loss, hyper)), labels, ignore_index, reduction, num_items_in_batch),
        student_logits, compute_grad)
    _validate.rows_defined("fused_kd_loss", rows, "student_logits or teacher_logits")
    return loss, grad


def kd_slice_stats(student_logits, teacher_logits, labels, hyper, ignore_index, class_offset, n_classes):
    _validate.slice_of_rows("kd_slice_stats", student_logits, labels, ignore_index, class_offset, n_classes)
    return reference.kd_slice_stats(
        student_logits, teacher_logits, labels, ignore_index=ignore_index, class_offset=class_offset,
        n_classes=n_classes, **hyper_keywords(reference.kd_slice_stats, hyper))


def kd_slice_jsd_sums(student_logits, teacher_logits, labels, stats, hyper, ignore_index):
    return reference.kd_slice_jsd_sums(student_logits, teacher_logits, labels, stats, ignore_index=ignore_index,
                                       **hyper_keywords(reference.kd_slice_jsd_sums, hyper))


def kd_slice_loss(student_logits, teacher_logits, labels, stats, jsd_sums, hyper, ignore_index, reduction,
                  num_items_in_batch, class_offset, n_classes, compute_grad):
    _validate.slice_of_rows("kd_slice_loss", student_logits, labels, ignore_index, class_offset, n_classes)
    rows, grad = reference.kd_slice_rows(
        student_logits, teacher_logits, labels, stats, jsd_sums, ignore_index=ignore_index, class_offset=class_offset,
        n_classes=n_classes, **hyper_keywords(reference.kd_slice_rows, hyper))
    _validate.rows_defined("kd_slice_loss", rows, "student_logits or teacher_logits")
    divisor = reference.mean_divisor(labels, ignore_index, rows.shape[0])
    loss = reference.reduce_rows(rows, reduction, divisor, num_items_in_batch)
    if not compute_grad:
        return loss, student_logits.new_empty((0,))
    return loss, (grad / reference.reduction_divisor(reduction, divisor, num_items_in_batch)).to(student_logits.dtype)


def scale_grad_(grad, scale):
    grad.mul_(scale if scale.dim() == 0 else scale.to(grad.device).unsqueeze(1))


# --- pseudo-labels -------------------------------------------------------------------------------


def select_pseudo_labels(logits, threshold, temperature, class_thresholds):
    labels, confidence, mask = reference.select_pseudo_labels(logits, float(threshold), float(temperature),
                                                              class_thresholds)
    _validate.rows_defined("select_pseudo_labels", confidence, "logits")
    return labels, confidence, mask


def fused_pseudo_label_loss(strong_logits, weak_logits, threshold, temperature, soft, class_thresholds, weights,
                            reduction, compute_grad):
    def loss_of(s):  # the reduced loss, and the rows to name an undefined one
        rows, *rest = reference.fused_pseudo_label_loss(s, weak_logits, float(threshold), float(temperature), soft,
                                                        class_thresholds, weights, "none")
        return (reference.reduce_pseudo_label_rows(rows, reduction), rows, *rest)

    (loss, rows, labels, confidence, mask, counts), grad = _with_grad(loss_of, strong_logits, compute_grad)
    _validate.rows_defined("fused_pseudo_label_loss", confidence, "weak_logits")
    _validate.rows_defined("fused_pseudo_label_loss", rows, "strong_logits")
    return loss, grad, labels, confidence, mask, counts


# --- adversarial steps ---------------------------------------------------------------------------


def _faults(op: str, inp_name: str, inp: Tensor, radius: Tensor, lo, hi, out: Tensor, inputs, sizes: str) -> None:
    """What the compiled kernels check where they read the data: the input within eps of the
    clamp box, and no finite input stepped out of its dtype's range."""
    acc = opmath(inp)
    a = inp.to(acc)
    if lo is not None:
        outside = (a + radius.to(acc) < lo.to(acc)) | (hi.to(acc) < a - radius.to(acc))
        _validate.no_bad_values(outside, f"{op}: {inp_name} lies farther than eps outside the clamp box, so the clamp "
                                f"would move the result more than eps from {inp_name}. {BOX_FIX}")
    finite = torch.isfinite(inputs[0])
    for t in inputs[1:]:
        finite &= torch.isfinite(t)
    _validate.no_bad_values(~torch.isfinite(out) & finite,
                            f"{op}: the step is not finite in {str(out.dtype)[6:]}: {sizes} beyond its range for this "
                            f"input (largest finite value {torch.finfo(out.dtype).max:g}). Use a smaller value, a "
                            "clamp within the range, or a wider dtype.")


def _clamp(lo, hi):
    return None if lo is None else (lo, hi)


def _fgsm(op, x, grad, eps, clamp_min, clamp_max):
    out = reference.fgsm_perturb(x, grad, eps, _clamp(clamp_min, clamp_max))
    _faults(op, "x", x, eps, clamp_min, clamp_max, out, (x,), "eps is")
    return out


def fgsm_perturb(x, grad, eps, clamp_min, clamp_max):
    return _fgsm("fgsm_perturb", x, grad, eps, clamp_min, clamp_max)


def fgsm_perturb_(x, grad, eps, clamp_min, clamp_max):
    x.copy_(_fgsm("fgsm_perturb_", x, grad, eps, clamp_min, clamp_max))


def _pgd(op, x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
    out = reference.pgd_step(x_adv, x_orig, grad, step_size, eps, _clamp(clamp_min, clamp_max))
    _faults(op, "x_orig", x_orig, eps, clamp_min, clamp_max, out, (x_adv, x_orig), "step_size and eps are")
    return out


def pgd_step(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
    return _pgd("pgd_step", x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max)


def pgd_step_(x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max):
    x_adv.copy_(_pgd("pgd_step_", x_adv, x_orig, grad, step_size, eps, clamp_min, clamp_max))


# --- knowledge distillation from a sparse teacher ------------------------------------------------


def sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, teacher_mask, labels, hyper, truncation,
                   ignore_index, reduction, num_items_in_batch, compute_grad):
    n_classes = student_logits.shape[-1]
    if labels is not None:
        _validate.labels_in_range("sparse_kd_loss", labels, n_classes, ignore_index)
    read = reference.sparse_teacher_entries(teacher_indices, teacher_mask, labels, ignore_index)
    _validate.teacher_indices_in_range("sparse_kd_loss", teacher_indices, read, n_classes)
    (loss, rows), grad = _with_grad(_reduced(lambda s: reference.sparse_kd_loss(
        s, teacher_indices, teacher_logprobs, teacher_mask, truncation=truncation, labels=labels,
        ignore_index=ignore_index, reduction="none", **hyper_keywords(reference.sparse_kd_loss, hyper)),
        labels, ignore_index, reduction, num_items_in_batch),
        student_logits, compute_grad)
    _validate.rows_defined("sparse_kd_loss", rows, "student_logits or teacher_logprobs")
    return loss, grad


def sparse_slice_stats(student_logits, column, labels, hyper, truncation, ignore_index, class_offset, n_classes):
    _validate.slice_of_rows("sparse_slice_stats", student_logits, labels, ignore_index, class_offset, n_classes)
    _validate.slice_columns("sparse_slice_stats", column, student_logits.shape[-1])
    kw = dict(truncation=truncation, ignore_index=ignore_index, class_offset=class_offset, n_classes=n_classes,
              **hyper_keywords(reference.sparse_slice_stats, hyper))
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    out = student_logits.new_empty((student_logits.shape[0], reference.SP_ENTRIES + column.shape[-1]), dtype=acc)
    for b in reference.row_blocks(*student_logits.shape):  # temporaries of a block's size (reference.py)
        out[b] = reference.sparse_slice_stats(student_logits[b], column[b], None if labels is None else labels[b],
                                              **kw)
    return out


def sparse_slice_grad(student_logits, column, labels, coefficients, hyper, ignore_index, class_offset):
    _validate.slice_columns("sparse_slice_grad", column, student_logits.shape[-1])
    kw = dict(ignore_index=ignore_index, class_offset=class_offset,
              **hyper_keywords(reference.sparse_slice_grad, hyper))
    grad = torch.empty_like(student_logits)
    for b in reference.row_blocks(*student_logits.shape):
        grad[b] = reference.sparse_slice_grad(student_logits[b], column[b], None if labels is None else labels[b],
                                              coefficients[b], **kw)
    return grad
