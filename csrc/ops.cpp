// The Python module lepton_fast._C. Importing it runs the static registrations of the C++
// kernels (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp, csrc/cuda/*.cu and csrc/autograd.cpp) under the
// op schemas, which lepton_fast/ops/<family>.py define in Python (torch.library) before
// lepton_fast/_backend.py loads this module: the extension defines no schema.
//
// Conventions of every schema (the kernels rely on them):
//   - logits are [N, C] with rows contiguous along C (the Python layer flattens [..., C]);
//   - a floating hyper-parameter (temperature, beta, eps, ...) is a 0-d float64 CPU tensor,
//     so that a changing value neither recompiles a torch.compile graph nor syncs a device;
//   - argument values are checked once, in Python (lepton_fast/_validate.py), before any
//     kernel runs; kernels check shapes, dtypes, devices and strides, and the data they read
//     (label ranges, rows whose softmax is undefined), raising ValueError on the CPU.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>

#include "cpu/grad_buffer.h"

namespace {

// The number of threads an at::parallel_for in this library really runs on, at most
// torch.get_num_threads(). It is 1 whatever torch says when the extension was compiled
// without OpenMP (at::parallel_for is inline; its pragma is then ignored), which no result
// shows, only the time: `lepton-fast info` and tests/test_packaging.py read it.
PyObject* parallel_threads(PyObject*, PyObject*) {
  std::atomic<int> width{0};
  Py_BEGIN_ALLOW_THREADS
  at::parallel_for(0, 1 << 12, 1, [&](int64_t, int64_t) {
    const int mine = at::get_thread_num() + 1;
    int seen = width.load();
    while (seen < mine && !width.compare_exchange_weak(seen, mine)) {
    }
  });
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(width.load());
}

// An uninitialised contiguous CPU tensor like `like`, from the fused losses' recycled gradient
// block (cpu/grad_buffer.h): for a gradient that Python code has kernels write block by block
// (lepton_fast.distributed's row blocks, through kd_slice_loss.grad_out), which a fresh
// torch.empty of its size would fault in page by page every step.
PyObject* empty_gradient_like(PyObject*, PyObject* like) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(THPVariable_Check(like), "empty_gradient_like takes a tensor");
  const at::Tensor& x = THPVariable_Unpack(like);
  TORCH_CHECK(x.device().is_cpu(), "empty_gradient_like takes a CPU tensor, got one on ", x.device());
  return THPVariable_Wrap(lepton_fast::cpu::GradientBlockCache::get().empty_like(x));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"parallel_threads", parallel_threads, METH_NOARGS, "Threads an at::parallel_for of lepton_fast runs on."},
    {"empty_gradient_like", empty_gradient_like, METH_O,
     "An uninitialised CPU tensor like the argument, from the recycled gradient block."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import lepton_fast._C` runs the static registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
