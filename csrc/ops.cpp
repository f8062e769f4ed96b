// Every op schema of lepton_fast, in one place. The kernels register their
// implementations with TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu;
// lepton_fast/ops/<op>.py wraps them in the public custom ops (fake impls, autograd).
#include <Python.h>
#include <torch/library.h>

// `import lepton_fast._C` runs the static registrations below; the module has no functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(lepton_fast, m) {
  // Per-row knowledge-distillation loss of [N, C] logits (rows contiguous along C) and,
  // when compute_grad, d(row loss)/d(student) * grad_scale (a 0-d float32 tensor) in the
  // student's dtype. Ignored rows: loss 0, gradient 0. A row whose softmax is undefined
  // (entirely -inf) yields NaN, which the Python layer turns into an error.
  m.def(
      "kd_loss_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, "
      "float temperature, str divergence, float beta, float alpha, float label_smoothing, "
      "int ignore_index, bool scale_by_t2, bool compute_grad) -> (Tensor, Tensor)");
  // grad *= scale, in place; scale is 0-d (skipped on the device when it is exactly 1)
  // or [N], one factor per row of the [N, C] grad.
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");

  // Pseudo-labels of [N, C] logits (rows contiguous along C): (labels int64 [N], confidence
  // [N] float32 (float64 for double), mask bool [N]), mask = confidence >= threshold or
  // >= class_thresholds[label] ([C] float32). A row whose softmax is undefined gives NaN.
  m.def(
      "select_pseudo_labels(Tensor logits, Tensor? class_thresholds, float threshold, "
      "float temperature) -> (Tensor, Tensor, Tensor)");
  // FixMatch's unlabeled loss per row of [N, C] strong/weak views: (row losses [N], gradient
  // d(row loss)/d(strong) * grad_scale in strong's dtype or an empty tensor, labels, confidence,
  // mask) as select_pseudo_labels gives them for weak. The row weight is weights[row] ([N],
  // float32; float64 for double) if given, else the mask.
  m.def(
      "pseudo_label_loss_forward(Tensor strong, Tensor weak, Tensor? class_thresholds, Tensor? weights, "
      "float threshold, float temperature, bool soft, float grad_scale, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Adversarial perturbation steps on contiguous tensors of one floating dtype, written into
  // `out` (which may be the input x / x_adv itself: the kernels are elementwise). A per-sample
  // tensor [N] (opmath dtype) replaces the float beside it and applies to consecutive runs of
  // numel / N elements. sign(0) = sign(NaN) = 0. clamp bounds are both given or both None.
  //   fgsm: out = clamp(x + eps * sign(grad))
  //   pgd:  out = clamp(x_orig + clamp(x_adv + step_size * sign(grad) - x_orig, -eps, eps))
  m.def(
      "fgsm_perturb_out(Tensor x, Tensor grad, float eps, Tensor? eps_per_sample, float? clamp_min, "
      "float? clamp_max, Tensor(a!) out) -> ()");
  m.def(
      "pgd_step_out(Tensor x_adv, Tensor x_orig, Tensor grad, float step_size, Tensor? step_per_sample, "
      "float eps, Tensor? eps_per_sample, float? clamp_min, float? clamp_max, Tensor(a!) out) -> ()");
}
