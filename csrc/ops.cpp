// Every op schema of lepton_fast, in one place: one schema per public op (plus scale_grad_,
// the fused losses' backward). Per-device kernels register under these names in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, the autograd kernels in csrc/autograd.cpp, the
// fake (meta) kernels and the Triton kernels in lepton_fast/ops/<op>.py.
//
// Conventions of every schema:
//   - logits are [N, C] with rows contiguous along C (the Python layer flattens [..., C]);
//   - a floating hyper-parameter (temperature, beta, eps, ...) is a 0-d float64 CPU tensor,
//     so that a changing value neither recompiles a torch.compile graph nor syncs a device;
//   - argument values are checked once, in Python (lepton_fast/_validate.py), before any
//     kernel runs; kernels check shapes, dtypes, devices and strides, and the data they read
//     (label ranges, rows whose softmax is undefined), raising ValueError on the CPU.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

TORCH_LIBRARY(lepton_fast, m) {
  // Knowledge distillation (csrc/kd_loss.h has the formulas): the loss as `reduction` asks
  // (float32; float64 for float64 logits) and, when compute_grad, d(loss)/d(student_logits)
  // in the student's dtype, written during the forward. "mean" divides by the rows whose label
  // is not ignore_index (at least 1); num_items_in_batch, when given, divides the sum instead.
  m.def(
      "fused_kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor temperature, "
      "Tensor beta, Tensor alpha, Tensor label_smoothing, str divergence, int ignore_index, bool scale_by_t2, "
      "str reduction, Tensor? num_items_in_batch, bool compute_grad) -> (Tensor loss, Tensor grad)");
  // fused_kd_loss split at its steps (csrc/kd_loss.h), for rows whose columns lie in slices
  // (lepton_fast/distributed.py: a vocabulary split over ranks). Each op reads the [N, C_r]
  // slice of the rows' columns that starts at column class_offset of rows of n_classes;
  // labels are class ids of the whole row. The caller merges the statistics of all slices in
  // between (KDStat in csrc/kd_loss.h has the layout and the merge).
  //   kd_slice_stats: each row's statistics over the slice, [N, 7] (float32; float64 for
  //     float64 logits); rows whose label is ignore_index get zeros.
  //   kd_slice_jsd_sums: given the merged statistics, the slice's part of the JSD's sums
  //     K_t = KL(p_t || m), K_s = KL(p_s || m), [N, 2] (0 at ignored rows).
  //   kd_slice_loss: given the merged statistics (and merged jsd_sums for the JSD), the loss of
  //     the whole rows as fused_kd_loss gives it, and the gradient of the slice (its Autograd
  //     kernel is fused_kd_loss's).
  m.def(
      "kd_slice_stats(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor temperature, "
      "Tensor beta, Tensor alpha, Tensor label_smoothing, str divergence, int ignore_index, int class_offset, "
      "int n_classes) -> Tensor");
  m.def(
      "kd_slice_jsd_sums(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor stats, "
      "Tensor temperature, Tensor beta, int ignore_index) -> Tensor");
  m.def(
      "kd_slice_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor stats, Tensor? jsd_sums, "
      "Tensor temperature, Tensor beta, Tensor alpha, Tensor label_smoothing, str divergence, int ignore_index, "
      "bool scale_by_t2, str reduction, Tensor? num_items_in_batch, int class_offset, int n_classes, "
      "bool compute_grad) -> (Tensor loss, Tensor grad)");
  // FixMatch's unlabeled loss (csrc/pseudo_labels.h): pseudo-labels from the weak view, masked
  // cross-entropy on the strong view. Returns (loss, d(loss)/d(strong) or an empty tensor,
  // labels int64 [N], confidence [N], mask bool [N], class_counts int64 [C]). "mean" divides
  // by N. The row weight is weights[row] ([N]) when given, else the mask.
  m.def(
      "fused_pseudo_label_loss(Tensor strong_logits, Tensor weak_logits, Tensor threshold, Tensor temperature, "
      "bool soft, Tensor? class_thresholds, Tensor? weights, str reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor grad, Tensor labels, Tensor confidence, Tensor mask, Tensor class_counts)");
  // The backward of both fused losses: grad *= scale in place, scale 0-d (skipped, on the
  // device, when exactly 1) or [N] (one factor per row of the [N, C] grad).
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");

  // Pseudo-labels of [N, C] logits: (labels int64 [N], confidence [N] float32 (float64 for
  // float64), mask bool [N]), mask = confidence >= threshold, or >= class_thresholds[label].
  m.def(
      "select_pseudo_labels(Tensor logits, Tensor threshold, Tensor temperature, Tensor? class_thresholds) "
      "-> (Tensor labels, Tensor confidence, Tensor mask)");

  // L-inf perturbation steps (csrc/adversarial.h) on tensors of one floating dtype. eps,
  // step_size, clamp_min and clamp_max are each a 0-d CPU tensor (read on the host) or a tensor
  // in x's opmath dtype on x's device that broadcasts to x: per sample [N, 1, ...], per channel
  // [C, 1, 1] (the box of a normalised image), full shape, ...; the clamp bounds are both given
  // or both None. The in-place forms overwrite their first argument. The kernels refuse (CPU:
  // ValueError; CUDA: a device assertion) an input (fgsm: x, pgd: x_orig) farther than eps
  // outside [clamp_min, clamp_max], and a finite input whose result is not finite in its dtype.
  //   fgsm: clamp(x + eps * sign(grad))
  //   pgd:  clamp(x_orig + clamp(x_adv + step_size * sign(grad) - x_orig, -eps, eps))
  m.def("fgsm_perturb(Tensor x, Tensor grad, Tensor eps, Tensor? clamp_min, Tensor? clamp_max) -> Tensor");
  m.def("fgsm_perturb_(Tensor(a!) x, Tensor grad, Tensor eps, Tensor? clamp_min, Tensor? clamp_max) -> ()");
  m.def(
      "pgd_step(Tensor x_adv, Tensor x_orig, Tensor grad, Tensor step_size, Tensor eps, Tensor? clamp_min, "
      "Tensor? clamp_max) -> Tensor");
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x_orig, Tensor grad, Tensor step_size, Tensor eps, Tensor? clamp_min, "
      "Tensor? clamp_max) -> ()");
}
