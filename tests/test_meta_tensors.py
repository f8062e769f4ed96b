"""Every op refuses a meta tensor (a model built under torch.device("meta") gives them: a shape
and a dtype, no data) with an error that names the argument and says to materialise it; it was
"could not parse dispatch key: META" from the dispatcher."""
import pytest
import torch

import lepton_fast as lf


def meta(*shape):
    return torch.empty(*shape, device="meta")


CASES = {
    "fused_kd_loss": ("student_logits", lambda: lf.fused_kd_loss(meta(4, 5), meta(4, 5))),
    "fused_kd_loss teacher": ("teacher_logits", lambda: lf.fused_kd_loss(torch.randn(4, 5), meta(4, 5))),
    "fused_linear_kd_loss": ("student_hidden", lambda: lf.fused_linear_kd_loss(meta(4, 3), meta(5, 3), meta(4, 3),
                                                                               meta(5, 3))),
    "fused_linear_kd_loss weight": ("student_weight", lambda: lf.fused_linear_kd_loss(
        torch.randn(4, 3), meta(5, 3), torch.randn(4, 3), torch.randn(5, 3))),
    "sparse_kd_loss teacher": ("teacher_logprobs", lambda: lf.sparse_kd_loss(
        torch.randn(4, 5), torch.zeros(4, 2, dtype=torch.long), meta(4, 2))),
    "fused_linear_sparse_kd_loss": ("student_hidden", lambda: lf.fused_linear_sparse_kd_loss(
        meta(4, 3), meta(5, 3), meta(4, 2).long(), meta(4, 2))),
    "fused_linear_sparse_kd_loss teacher": ("teacher_indices", lambda: lf.fused_linear_sparse_kd_loss(
        torch.randn(4, 3), torch.randn(5, 3), meta(4, 2).long(), torch.randn(4, 2))),
    "select_pseudo_labels": ("logits", lambda: lf.select_pseudo_labels(meta(4, 5))),
    "fused_pseudo_label_loss": ("strong_logits", lambda: lf.fused_pseudo_label_loss(meta(4, 5), meta(4, 5))),
    "fgsm_perturb": ("x", lambda: lf.fgsm_perturb(meta(4, 5), meta(4, 5), 0.1)),
    "pgd_step": ("x_adv", lambda: lf.pgd_step(meta(4, 5), meta(4, 5), meta(4, 5), 0.01, 0.03)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_tensor_is_refused_naming_the_argument(case):
    name, call = CASES[case]
    with pytest.raises(ValueError, match=f"^{name} is a meta tensor .* materialise it first"):
        call()
