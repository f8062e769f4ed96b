"""Shared test set-up.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; the switch must
be set before triton is first imported, which is why it lives at the top of conftest.

An old Triton's interpreter may not run on the installed numpy (Triton 3.6, torch 2.11's,
with numpy >= 2.4: ``TypeError: only 0-dimensional arrays can be converted to Python
scalars`` on any loop over a runtime bound). A tiny known-good probe kernel decides that,
once, before any test: only when the probe fails with exactly that error are the tests that
run Triton's interpreter skipped, with a reason that names the versions and the fix (at
collection where the test says so, else at its first launch, before the kernel runs); a
kernel fault can never cause a skip, since no test's own error is looked at.
``LEPTON_FAST_REQUIRE_TRITON_INTERPRETER=1`` (set by CI) turns that skip into an error.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lepton_fast  # noqa: E402
from lepton_fast import _backend  # noqa: E402


# numpy >= 2.4 refuses int() of a 1-element array, which Triton 3.6's interpreter does for a
# loop bound; Triton 3.8 no longer does.
NUMPY_SCALAR_ERROR = "only 0-dimensional arrays can be converted to Python scalars"
_interpreter_unusable = None  # set by pytest_configure: why Triton's interpreter cannot run here


def triton_interpreter_probe():
    """None when Triton's interpreter runs a tiny known-good kernel correctly, else
    ("incompatible", why) for the known numpy incompatibility, ("error", why) for anything
    else (which skips nothing: the tests then show it)."""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):  # a runtime loop bound, as every row kernel has
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, 0))

    x = torch.arange(10, dtype=torch.float32)
    out = torch.zeros(1)
    try:
        probe[(1,)](x, out, 10, BLOCK=4)
    except Exception as e:
        versions = f"Triton {triton.__version__}, numpy {numpy.__version__}"
        if NUMPY_SCALAR_ERROR in str(e) or NUMPY_SCALAR_ERROR in repr(e.__cause__):
            return ("incompatible",
                    f"Triton {triton.__version__}'s interpreter cannot run on numpy {numpy.__version__} "
                    f"(TypeError: {NUMPY_SCALAR_ERROR}); with Triton < 3.8 install numpy < 2.4: "
                    f'pip install "numpy<2.4"')
        return ("error", f"the interpreter probe kernel failed ({versions}): {type(e).__name__}: {e}")
    if out.item() != 45.0:
        return ("error", f"the interpreter probe kernel returned {out.item()}, not 45")
    return None


def runs_triton_interpreter(item) -> bool:
    """Whether a test runs a Triton kernel on CPU tensors, in the interpreter: marked
    ``triton_interpreter``, parametrized with backend "triton", or named test_triton_*."""
    if "cuda" in item.keywords:
        return False
    if item.get_closest_marker("triton_interpreter") is not None:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(isinstance(v, str) and v == "triton" for v in params.values()):
        return True
    return item.originalname.startswith("test_triton_") if hasattr(item, "originalname") else False


def _refuse_interpreted_launches(reason: str) -> None:
    """Tests that launch a Triton kernel where the collection could not tell (a loop over
    the backends inside one test) skip at the launch, before the kernel runs: the skip comes
    from the probe's verdict, never from the kernel's own outcome."""
    from triton.runtime import interpreter

    def refuse(self, *args, **kwargs):
        pytest.skip(reason)

    interpreter.GridExecutor.__call__ = refuse


def pytest_report_header(config):
    if _interpreter_unusable is not None:
        return f"Triton interpreter tests SKIPPED: {_interpreter_unusable}"
    return None


def pytest_configure(config):
    global _interpreter_unusable
    try:
        import triton  # noqa: F401
    except ImportError:
        triton = None
    if os.environ.get("TRITON_INTERPRET") == "1" and triton is not None:
        verdict = triton_interpreter_probe()
        if verdict is not None and verdict[0] == "incompatible":
            if os.environ.get("LEPTON_FAST_REQUIRE_TRITON_INTERPRETER") == "1":
                pytest.exit(f"LEPTON_FAST_REQUIRE_TRITON_INTERPRETER=1: {verdict[1]}", returncode=2)
            _interpreter_unusable = verdict[1]
            _refuse_interpreted_launches(verdict[1])
        elif verdict is not None:
            print(f"conftest: {verdict[1]} (no test is skipped for it)", file=sys.stderr)
    # A test run that silently fell back to reference.py would test nothing compiled.
    status = _backend.extension()
    if status.module is None and os.environ.get("LEPTON_FAST_SKIP_EXT") != "1":
        pytest.exit(
            f"lepton_fast._C is not loaded ({status.reason}); imported lepton_fast from "
            f"{lepton_fast.__file__}. Install as the README says, or set LEPTON_FAST_SKIP_EXT=1 "
            "to test the reference alone.",
            returncode=2,
        )


# Known failures of an old torch, as expected failures that are strict (once fixed, the test
# fails until its entry goes) and limited to the error named (any other error still fails).


OLD_TORCH_XFAILS = [
    # (newest torch affected, which tests (item -> bool), the error they raise, why); none today
]


def _torch_minor() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(reason=_interpreter_unusable or "")
    xfails = []
    for newest, affected, error, reason in OLD_TORCH_XFAILS:
        if _torch_minor() <= newest:
            module, _, cls = error.rpartition(".")
            xfails.append((affected, pytest.mark.xfail(raises=getattr(importlib.import_module(module), cls),
                                                       strict=True, reason=reason)))
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        elif _interpreter_unusable is not None and runs_triton_interpreter(item):
            item.add_marker(skip_interpreter)
        for affected, mark in xfails:
            if affected(item):
                item.add_marker(mark)


def low_precision_tolerance(dtype, ref_err, backend, magnitude):
    """Bound on a bf16/fp16 result's error: 2x the error of reference.py run in that dtype.

    Triton's interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest
    even, as the kernels ask), an error below one ulp, 2^-7 |x|, not half of one; where the
    interpreter runs a bfloat16 kernel the bound is at least that ulp of ``magnitude``.
    """
    tol = 2 * ref_err + 1e-6
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        tol = max(tol, 2.0**-7 * magnitude)
    return tol


# The documented range of every op's temperature, 1e-8 ... 1e4, in steps: every kernel must
# agree with the float64 oracle across it (a kernel that scales before it subtracts the max
# leaves confidences above 1 and overflows at the small end).
TEMPERATURES = [pytest.param(t, id=f"T={t:g}") for t in (1e-8, 1e-4, 1e-2, 1.0, 1e2, 1e4)]


def temperature_sweep_logits(shape, temperature, seed, device="cpu"):
    """Logits of an LLM's size (|x| ~ 30: at T = 1e-8, z = x / T ~ 3e9, whose float32 rounding
    alone is 128), float32 for T <= 100 and float64 above, where the soft term of a KD loss,
    O(1 / T^2) multiplied back by T^2, loses its digits in float32 (the documented precision).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if temperature <= 100 else torch.float64
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 30).to(dtype).to(device)


# Rows (student, teacher, T) where student and teacher disagree by far more than T in raw
# logits (a new user's hunt, 2026-12-07): the teacher one-hot against the student's z = [0,
# 1, 2, 3] (forward KL = log(1 + e + e^2 + e^3) = 3.44, with the teacher's 50 / T to cancel);
# both one-hot at the same class with the raw logits 21.6 apart there (KL 0; it gave -126.8
# on the CPU's vector kernels).
DISAGREEING_ROWS = {
    "one-hot-p": ([0.0, 1e-6, 2e-6, 3e-6], [50.0, 0.0, 0.0, 0.0], 1e-6),
    "same-argmax": ([22.3, 5.1, -3.7, 0.2, 1.5], [0.7, -1.2, -5.0, 0.6, 0.65], 1e-8),
}


def disagreeing_rows(row, divergence, n=3, device="cpu"):
    """(student, teacher, T): ``n`` float32 copies of DISAGREEING_ROWS[row], student and teacher
    swapped for reverse KL, whose p is the student."""
    student, teacher, temperature = DISAGREEING_ROWS[row]
    if divergence == "reverse_kl":
        student, teacher = teacher, student
    s, t = (torch.tensor([x], device=device).repeat(n, 1) for x in (student, teacher))
    return s, t, temperature


# Every kernel of an op, by the device of its tensors: the C++ kernel, the Triton kernel
# (under the interpreter on CPU tensors) and the reference kernel. The CUDA cases carry the
# `cuda` mark, so that `pytest -m cuda` on a GPU machine runs every GPU kernel and nothing else.
DEVICE_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("cpu", "triton", id="cpu-triton"),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.cuda),
    # lepton_fast/ops/_reference.py: the CPU kernel of a pure-Python install
    pytest.param("cpu", "reference", id="cpu-reference"),
]
# The kernels of CPU tensors: where a data check (a label or index range, an undefined row)
# raises ValueError. On a GPU it is a device assertion instead: assert_device_assertion.
CPU_DEVICE_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[0] == "cpu"]


def require(spec, device: str, backend: str) -> None:
    """Skip a case whose kernel cannot run here (the Triton interpreter where a GPU is, say);
    on a GPU machine a CUDA case that cannot run is a failure, not a skip."""
    if backend == "cuda" and not spec.cuda_cpp:
        pytest.skip(f"{spec.name} has no CUDA C++ kernel (Triton is its CUDA kernel)")
    why = _backend.unavailable(spec, backend, device)
    if why is None:
        return
    if device == "cuda" and torch.cuda.is_available():
        pytest.fail(f"{spec.name}: the {backend} kernel cannot run on this GPU machine: {why}")
    pytest.skip(why)


def interpreted(device: str, backend: str) -> bool:
    """Triton's interpreter: correct, but about a thousand times slower than a kernel."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(autouse=True)
def poison_new_buffers():
    """Every torch.empty (the kernels' outputs included) comes back filled with NaN, or the
    largest integer, so that an element a kernel forgot to write shows in the result."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def loss_and_grads(fn, x: dict, differentiable, grad_output=None):
    """(loss, {name: grad}) of ``fn(**leaves)``, ``leaves`` fresh copies of the tensors of ``x``
    (None stays None) of which those named in ``differentiable`` require grad; the backward
    runs with ``grad_output`` (ones by default)."""
    leaves = {k: (t if t is None else t.detach().clone().requires_grad_(k in differentiable)) for k, t in x.items()}
    loss = fn(**leaves)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), {k: leaves[k].grad for k in differentiable if leaves.get(k) is not None}


def assert_close_to_oracle(got, want, x: dict, tol: dict) -> None:
    """``got`` and ``want``, (loss, {name: grad}) as :func:`loss_and_grads` gives them, of an op
    and of its float64 oracle on the inputs ``x``: a float32 loss (float64 for float64 inputs),
    each gradient in its input's dtype and shape, all within ``tol`` of the oracle's."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    wide = any(x[k].dtype == torch.float64 for k in grads)
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    for k, g in grads.items():
        assert g.dtype == x[k].dtype and g.shape == x[k].shape, k
        torch.testing.assert_close(g.double(), ref_grads[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def largest_allocation(fn) -> int:
    """The largest single CPU allocation, in bytes, while ``fn()`` runs (torch.profiler's
    allocator events): what shows whether an op materialises a buffer of some size."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def opcheck_kernel(spec, device: str, backend: str, arg_sets) -> None:
    """torch.library.opcheck of ``spec``'s op, run by ``backend``'s kernel, on each argument
    tuple: the schema, fake kernel, autograd registration and, except in Triton's interpreter
    (where its dozens of launches take minutes), AOT dispatch."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(device, backend):
        utils += ("test_aot_dispatch_dynamic",)
    op = getattr(torch.ops.lepton_fast, spec.name).default
    for args in arg_sets:
        with _backend.running(spec, backend, device):
            torch.library.opcheck(op, args, test_utils=utils)


def run_on_each_cpu_capability(script: str) -> None:
    """Runs ``script`` in a fresh process at the portable baseline and at AVX2. The CPU row
    kernels are compiled once per instruction set and follow ATen's choice, which
    ATEN_CPU_CAPABILITY lowers, so one machine runs every build. The script prints
    ``torch.backends.cpu.get_cpu_capability()``, then "ok" when its checks passed."""
    for isa in ("default", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        capability, status = out.stdout.split()
        assert capability.lower() == isa.lower() or isa == "avx2" and capability == "DEFAULT"  # a CPU without AVX2
        assert status == "ok"


def assert_device_assertion(setup: str, valid: str, invalid: str) -> None:
    """On a GPU the data checks (label and index ranges, undefined rows) do not synchronise:
    they end the process as a device assertion, as ATen's nll_loss does, where a CPU tensor
    gets a ValueError. Run in a subprocess, as an assertion leaves the CUDA context unusable
    for every later test: ``setup`` builds the tensors, then the ``valid`` statement must pass
    and the ``invalid`` one must end the process."""
    script = "\n".join(["import torch, lepton_fast", textwrap.dedent(setup).strip(), valid,
                        "torch.cuda.synchronize()", 'print("valid call ok", flush=True)', invalid,
                        "torch.cuda.synchronize()", 'print("not refused", flush=True)'])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert "valid call ok" in run.stdout and "not refused" not in run.stdout, run.stdout + run.stderr[-2000:]
    assert run.returncode != 0


# The edges of Triton's column blocks, with a block small enough that they show: (n, c, block).
TRITON_COLUMN_BLOCKS = pytest.mark.parametrize(
    "n,c,block",
    [
        (3, 10, 16),  # C smaller than one block
        (2, 32, 16),  # C exactly two blocks
        (3, 50, 16),  # three full blocks and a ragged tail of 2 columns
        (2, 1, 16),  # a single class: every softmax is 1
    ],
    ids=["C<block", "C=2blocks", "ragged_tail", "C=1"],
)


def compiled_backends(spec, device_type):
    """Every non-reference backend that can run ``spec`` on ``device_type`` here."""
    return [b for b in ("cpu", "cuda", "triton") if _backend.unavailable(spec, b, device_type) is None]


# --- the broadcast operands of the adversarial steps (test_fgsm_perturb, test_pgd_step) ---
# x is [N, C, H, W] = [3, 2, 8, 9]: H * W = 72 elements per channel, above the CPU kernel's
# shortest vectorised segment (64), so each form below takes the path it is meant to take.
N, C, H, W = 3, 2, 8, 9
BROADCASTS = {
    "number": None,
    "0-d CPU tensor": (),  # a host scalar, read once
    "0-d on x's device": "device-0d",  # read by the kernel: one value repeated over all of x
    "per sample [N]": (N,),  # the 1-d form: one value per sample, viewed as [N, 1, 1, 1]
    "per sample [N,1,1,1]": (N, 1, 1, 1),  # constant over runs of C*H*W
    "per channel [C,1,1]": (C, 1, 1),  # normalised images: runs of H*W, the pattern repeating per sample
    "per channel [1,C,1,1]": (1, C, 1, 1),
    "per sample and channel [N,C,1,1]": (N, C, 1, 1),  # runs of H*W over N*C values
    "per pixel [H,W]": (H, W),  # varies along the trailing dims: a contiguous stretch per sample
    "full shape": (N, C, H, W),  # one value per element
    "[N,1,H,1]": (N, 1, H, 1),  # constant over C between dims it varies along: expanded to x's shape
    "[1,1,1,W]": (1, 1, 1, W),  # periods of 9 values: too short for the CPU's segments, expanded
}


def broadcast_operand(form, lo, hi, device, seed, dtype=torch.float32):
    """A value in [lo, hi] of the given form (a number for "number")."""
    g = torch.Generator().manual_seed(seed)
    if form is None:
        return lo + (hi - lo) * torch.rand((), generator=g).item()
    shape = () if form == "device-0d" else form
    value = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    return value.to(dtype).to(device if form != () else "cpu")


def as_broadcast(value, x):
    """The composition's view of an operand: the 1-d per-sample form as [N, 1, ...]."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and x.dim() > 1:
        return value.reshape((-1,) + (1,) * (x.dim() - 1))
    return value
