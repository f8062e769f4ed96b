"""Shared test set-up.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; the switch must
be set before triton is first imported, which is why it lives at the top of conftest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lepton_fast  # noqa: E402
from lepton_fast import _backend  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "network: downloads from the package index (skipped only when it is "
                                       "unreachable)")
    # A test run that silently fell back to reference.py would test nothing compiled.
    status = _backend.extension()
    if status.module is None and os.environ.get("LEPTON_FAST_SKIP_EXT") != "1":
        pytest.exit(
            f"lepton_fast._C is not loaded ({status.reason}); imported lepton_fast from "
            f"{lepton_fast.__file__}. Install as the README says, or set LEPTON_FAST_SKIP_EXT=1 "
            "to test the reference alone.",
            returncode=2,
        )


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


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


def compiled_backends(spec, device_type):
    """Every non-reference backend that can run ``spec`` on ``device_type`` here."""
    return [b for b in ("cpu", "cuda", "triton") if _backend.unavailable(spec, b, device_type) is None]


@pytest.fixture(autouse=True)
def poison_new_buffers():
    """Every torch.empty (the kernels' outputs included) comes back filled with NaN, or the
    largest integer, so that an element a kernel forgot to write shows in the result."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
