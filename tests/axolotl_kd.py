"""axolotl's top-k knowledge distillation, transcribed in plain PyTorch (axolotl is not a
dependency): the drop-in tests (tests/test_sparse_kd_loss.py,
tests/test_fused_linear_sparse_kd_loss.py) and the memory baseline of
benchmarks/bench_fused_linear.py --case sparse use it.

Sources (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/): chat_template.py (what the
collator stores), topk_logprob/forward_kl.py (the loss on [.., V] logits) and kernels/liger.py
(the chunked fused-linear loss that its trainer uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def axolotl_collated_logprobs(raw_logprobs, kd_temperature):
    """What axolotl's KD collator stores as target_logprobs (integrations/kd/chat_template.py):
    the teacher's top-k probabilities renormalised over the K entries, raised to 1 / T and
    renormalised again."""
    p = raw_logprobs.exp()
    p = (p / p.sum(-1, keepdim=True)) ** (1.0 / kd_temperature)
    return (p / p.sum(-1, keepdim=True)).log()


def axolotl_topk_forward_kl(student_logits, target_token_ids, target_logprobs, target_mask, num_items_in_batch=-1,
                            kd_temperature=1.0, normalize_topk=True):
    """axolotl's top-k forward KL (integrations/kd/topk_logprob/forward_kl.py, with the
    student renormalisation of kernels/liger.py's ``normalize_topk``): the student's log-softmax
    at T gathered at the teacher's ids (renormalised over the K ids when normalize_topk), KL
    summed over the entries of the mask, times T², divided by num_items_in_batch or else by the
    number of unmasked entries."""
    wide = torch.promote_types(student_logits.dtype, torch.float32)  # axolotl's .float(); float64 stays
    z = (student_logits / kd_temperature).to(wide)
    student_lp = z.gather(-1, target_token_ids) - z.logsumexp(-1, keepdim=True)
    if normalize_topk:
        student_lp = student_lp - student_lp.logsumexp(-1, keepdim=True)
    valid = target_mask.bool()
    teacher_lp = target_logprobs.to(wide)[valid]
    kd = (teacher_lp.exp() * (teacher_lp - student_lp[valid])).sum() * kd_temperature**2
    return kd / (num_items_in_batch if num_items_in_batch > 0 else valid.sum())


class AxolotlChunkedTopKLoss(torch.autograd.Function):
    """axolotl's ``LigerFusedLinearKLTopKLogprobFunction`` (kernels/liger.py) with the settings
    of its trainer for a soft loss only (``kd_ce_alpha=0``: no cross-entropy, no bias), eager
    (``compiled=False``). The class derives from Liger-Kernel's
    ``LigerFusedLinearDistillationBase`` but overrides its forward and backward, so none of
    Liger's code runs and ``torch.autograd.Function`` is the faithful base here.

    The structure, which decides its memory: the rows split into ``max(1, N // chunk_size)``
    chunks; per chunk ``torch.func.grad_and_value`` of (logits = chunk @ W.T, the top-k forward
    KL summed over the chunk) with respect to (chunk, W), which materialises the chunk's
    [rows, V] logits, their autograd intermediates and a whole [V, H] weight gradient that is
    then added to a [V, H] accumulator; the chunks' input gradients are concatenated. The
    backward returns the saved gradients, multiplied by grad_output unless it equals 1 (a host
    synchronisation). The loss is the sum over the unmasked entries times T²; axolotl's model
    forward divides it by ``num_items_in_batch``.

    apply(hidden [N, H], weight [V, H], target_token_ids [N, K], target_logprobs [N, K] (as the
    collator stores them), target_mask [N, K], temperature, normalize_topk, chunk_size) -> 0-d.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, logprobs, mask, temperature=1.0, normalize_topk=True,
                chunk_size=1024):
        def chunk_loss(h, w, ids, lp, m):
            # The chunk's sum times T² (axolotl applies T² once to the sum of the chunks: the same).
            return axolotl_topk_forward_kl(F.linear(h, w), ids, lp, m, 1, temperature, normalize_topk)

        grad_and_value = torch.func.grad_and_value(chunk_loss, argnums=(0, 1))
        grad_weight = torch.zeros_like(weight)
        loss = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        grad_inputs = []
        chunks = max(1, hidden.shape[0] // chunk_size)
        for h, ids, lp, m in zip(*(t.chunk(chunks) for t in (hidden, token_ids, logprobs, mask))):
            (grad_h, grad_w), value = grad_and_value(h, weight, ids, lp, m)
            grad_weight.add_(grad_w)
            loss.add_(value)
            grad_inputs.append(grad_h)
        ctx.save_for_backward(torch.cat(grad_inputs), grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad_input, grad_weight = grad_input * grad_output, grad_weight * grad_output
        return grad_input, grad_weight, None, None, None, None, None, None
