"""lepton_fast: fused kernels for cross-domain transfer learning.

Knowledge distillation, confidence-thresholded pseudo-labels and adversarial training as
custom autograd ops with CPU C++, CUDA C++ and Triton kernels and a pure-PyTorch reference.
"""
from lepton_fast import _backend

# First the schemas: each op family defines its ops (torch.library) beside its public function.
from lepton_fast.ops import adversarial, kd_loss, pseudo_labels, scale_grad, sparse_kd_loss  # noqa: F401

# Then the kernels: lepton_fast._C's C++ kernels, and the Triton and reference kernels (and the
# Python autograd kernels) under every key the extension left empty.
_backend.load_kernels()

from lepton_fast import thresholds  # noqa: E402
from lepton_fast._info import info  # noqa: E402
from lepton_fast.adversarial import fgsm, pgd, vat_loss  # noqa: E402
from lepton_fast.nn import GradientReversal, KDLoss  # noqa: E402
from lepton_fast.ops.adversarial import fgsm_perturb, fgsm_perturb_, pgd_step, pgd_step_  # noqa: E402
from lepton_fast.ops.grad_reverse import grad_reverse  # noqa: E402
from lepton_fast.ops.kd_loss import fused_kd_loss  # noqa: E402
from lepton_fast.ops.linear_kd_loss import fused_linear_kd_loss, fused_linear_sparse_kd_loss  # noqa: E402
from lepton_fast.ops.pseudo_labels import (  # noqa: E402
    PseudoLabelLoss,
    PseudoLabels,
    fused_pseudo_label_loss,
    select_pseudo_labels,
)
from lepton_fast.ops.sparse_kd_loss import sparse_kd_loss  # noqa: E402
from lepton_fast.version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "info",
    # knowledge distillation
    "KDLoss",
    "fused_kd_loss",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "sparse_kd_loss",
    # pseudo-labels
    "PseudoLabelLoss",
    "PseudoLabels",
    "fused_pseudo_label_loss",
    "select_pseudo_labels",
    "thresholds",
    # adversarial training
    "GradientReversal",
    "fgsm",
    "fgsm_perturb",
    "fgsm_perturb_",
    "grad_reverse",
    "pgd",
    "pgd_step",
    "pgd_step_",
    "vat_loss",
]
