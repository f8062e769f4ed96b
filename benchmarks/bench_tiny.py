"""Per-call cost at the shape an image classifier calls the fused losses with: [64, 10] float32.

Run: pytest benchmarks/bench_tiny.py --benchmark-only. At 640 elements the kernels' work is
nothing; what is timed is the path from the public function to the kernel and back through
autograd, against the eager PyTorch composition each fused op replaces (the variant a user
would otherwise write). One thread: at this size a second one only adds synchronisation.
Targets and measurements: benchmarks/RESULTS.md, section "Per-call cost at tiny shapes".
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import Case, run_variant
from lepton_fast import fused_kd_loss, fused_pseudo_label_loss

SHAPE = (64, 10)
ROUNDS = 2000  # calls per timing round: one call is tens of microseconds


def _eager_kd(student, teacher, temperature):
    """Hinton KD as PyTorch's own tutorial writes it: T² · KL(p_t ‖ p_s), batch mean."""
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def _fused_kd(student, teacher, temperature):
    return fused_kd_loss(student, teacher, temperature)


def _eager_pseudo_label(strong, weak, threshold):
    """FixMatch's unlabeled loss as USB writes it: hard pseudo-labels of the weak view,
    masked cross-entropy on the strong view, mean over all rows."""
    with torch.no_grad():
        confidence, labels = torch.softmax(weak, dim=-1).max(dim=-1)
        mask = (confidence >= threshold).float()
    return (F.cross_entropy(strong, labels, reduction="none") * mask).mean()


def _fused_pseudo_label(strong, weak, threshold):
    return fused_pseudo_label_loss(strong, weak, threshold).loss


def _case(name, threshold_or_t):
    def make():
        g = torch.Generator().manual_seed(0)
        student = (torch.randn(*SHAPE, generator=g) * 3).requires_grad_()
        teacher = torch.randn(*SHAPE, generator=g) * 3
        return (student, teacher, threshold_or_t), {}

    def run(fn, args, kwargs):
        # The same leaf every call; its .grad is dropped so that nothing accumulates.
        for _ in range(ROUNDS):
            args[0].grad = None
            fn(*args, **kwargs).backward()

    return Case(f"{name} {SHAPE[0]}x{SHAPE[1]} float32 fwd+bwd x{ROUNDS} (1 thread)", make, run)


CASES = {
    "kd": (_case("fused_kd_loss", 2.0), {"eager": _eager_kd, "lepton_fast": _fused_kd}),
    "pseudo_label": (_case("fused_pseudo_label_loss", 0.5),
                     {"eager": _eager_pseudo_label, "lepton_fast": _fused_pseudo_label}),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["eager", "lepton_fast"])
@pytest.mark.parametrize("op", list(CASES))
def test_tiny(benchmark, op, variant):
    case, variants = CASES[op]
    run_variant(benchmark, case, variant, variants[variant], rounds=7)
