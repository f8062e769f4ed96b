"""What the test files of the two fused-linear ops share (test_fused_linear_kd_loss.py,
test_fused_linear_sparse_kd_loss.py): the random inputs, the runs against the float64 oracle,
and the checks whose body is the same for both ops."""
import functools
import re

import pytest
import torch

from conftest import assert_close_to_oracle, largest_allocation, loss_and_grads

TOL = dict(atol=1e-5, rtol=1e-5)
GRADS = ("student_hidden", "student_weight", "student_bias")


def randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def as_float64(x):
    return {k: (t.double() if t is not None and t.is_floating_point() else t) for k, t in x.items()}


def run(fn, x, grad_output=None):
    """(loss, {name: grad}) of fn on fresh leaves of x; the student's tensors require grad."""
    return loss_and_grads(fn, x, GRADS, grad_output)


def ours(op, backend, x, grad_output=None, **kw):
    return run(lambda **a: op(**a, backend=backend, **kw), x, grad_output)


def oracle(reference_op, x, grad_output=None, chunk_size=None, **kw):
    """``reference_op`` in float64 on the same (already rounded) inputs; chunk_size means nothing there."""
    go = None if grad_output is None else grad_output.double()
    return run(lambda **a: reference_op(**a, **kw), as_float64(x), go)


def assert_matches(op, reference_op, backend, x, grad_output=None, tol=TOL, **kw):
    got = ours(op, backend, x, grad_output, **kw)
    assert_close_to_oracle(got, oracle(reference_op, x, grad_output, **kw), x, tol)
    return got


def bind(op, reference_op):
    """(ours, oracle, assert_matches) of one op, as its test file calls them."""
    return (functools.partial(ours, op), functools.partial(oracle, reference_op),
            functools.partial(assert_matches, op, reference_op))


def assert_compiled_matches(step, x, **compile_kw):
    """torch.compile(step, fullgraph=True) gives eager's loss and gradients."""
    want_loss, want = run(step, x)
    loss, got = run(torch.compile(step, fullgraph=True, **compile_kw), x)
    torch.testing.assert_close(loss, want_loss, **TOL)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL)


def gemm_shapes(fn):
    """Input shapes of every GEMM (aten::mm, addmm, addmm_) the call runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")]


def projection_rows(shapes, hidden_sizes, vocab=37):
    """Rows of the logits GEMMs (hidden [m, H] @ W.T) among ``shapes``."""
    return [s[0][0] for s in shapes if len(s[0]) == 2 and s[0][1] in hidden_sizes and s[1] == [s[0][1], vocab]]


def assert_no_buffer_of_n_by_v(call, n, v, chunk):
    """Nothing as large as N x V bytes (a bool [N, V]) is allocated by ``call`` (a forward and
    backward in chunks of ``chunk`` rows)."""
    largest = largest_allocation(call)
    assert largest >= chunk * v * 4  # the chunk's float32 logits were seen: the check is live
    assert largest < n * v, largest


def assert_row_error_in_callers_terms(call, public_name, argument, row, backend):
    """``call`` raises the ValueError that the row kernel finds in a chunk (a label, a teacher
    index out of range) in the caller's terms: it names ``public_name``, not the kernel's op,
    names ``argument``, and where the kernel says which row (the CPU C++ kernels; the reference
    and Triton kernels quote the values instead) it is ``row`` of the caller's flattened batch,
    not the row within the chunk."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{public_name}: {argument} must be"), message
    assert not re.search(r"\b(fused_kd_loss|sparse_kd_loss):", message), message
    rows = re.findall(r"\brow (\d+)", message)
    assert rows == [str(row)] if backend == "cpu" else rows in ([], [str(row)]), message


def assert_undefined_row_in_callers_terms(loss, x, public_name, backend):
    """``loss(**x)`` with a NaN in row 7 of student_hidden (of 10 rows, in chunks of 3) raises
    naming ``public_name`` and the product the bad logits came from, not the kernel's
    ``student_logits``, which the caller never passed."""
    x = {**x, "student_hidden": x["student_hidden"].clone()}
    x["student_hidden"][7, 0] = float("nan")
    with pytest.raises(ValueError) as info:
        loss(**x, chunk_size=3, backend=backend)
    message = str(info.value)
    assert message.startswith(f"{public_name}: "), message
    assert "student_hidden @ student_weight.T" in message and "student_logits" not in message, message


def assert_second_backward_and_second_order_raise(loss_of, weight):
    """``loss_of()`` is a fresh loss whose graph holds ``weight``."""
    loss = loss_of()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss_of(), weight, create_graph=True)
