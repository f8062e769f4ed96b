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

#include <atomic>

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

PyMethodDef methods[] = {
    {"parallel_threads", parallel_threads, METH_NOARGS, "Threads an at::parallel_for of lepton_fast runs on."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import lepton_fast._C` runs the static registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
