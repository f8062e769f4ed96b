// The entry points of every CPU row kernel for one instruction set. Each isa_<isa>.cpp
// defines LF_ISA (default, avx2 or avx512) and includes this file once, after switching the
// instruction set, so that the <op>_rows.h kernels compile for it. Where an ISA file cannot
// target its instruction set (not x86-64 GCC) it defines LF_ISA_FALLBACK, and its entry
// points forward to the baseline build. isa.h picks one of the three builds at run time.
//
// To add an op's row kernel: declare <kernel>_default/_avx2/_avx512 in its <op>_cpu.h and
// include that in row_kernels.h, include its <op>_rows.h below, add its entry point in
// both branches.
#define LF_CAT_(a, b) a##_##b
#define LF_CAT(a, b) LF_CAT_(a, b)

#include "row_kernels.h"
#ifndef LF_ISA_FALLBACK
#include "adversarial_rows.h"
#include "kd_loss_rows.h"
#include "pseudo_labels_rows.h"
#include "sparse_kd_loss_rows.h"
#endif

namespace lepton_fast {
namespace cpu {

#ifndef LF_ISA_FALLBACK
void LF_CAT(kd_rows, LF_ISA)(const KDRows& a, int64_t begin, int64_t end) { kd_rows_any_dtype(a, begin, end); }
void LF_CAT(pseudo_label_rows, LF_ISA)(const PseudoLabelRows& a, int64_t begin, int64_t end) {
  pseudo_label_rows_any_dtype(a, begin, end);
}
StepFaults LF_CAT(adversarial_step, LF_ISA)(const StepBuffers& a, int64_t begin, int64_t end) {
  return adversarial_step_any_dtype(a, begin, end);
}
void LF_CAT(sparse_kd_rows, LF_ISA)(const SparseRows& a, int64_t begin, int64_t end) {
  sparse_kd_rows_any_dtype(a, begin, end);
}
void LF_CAT(sparse_slice_stats_rows, LF_ISA)(const SparseSliceRows& a, int64_t begin, int64_t end) {
  with_row_dtype(a.dtype, [&](auto tag) { SparseRow<decltype(tag)>::slice_stats(a, begin, end); });
}
void LF_CAT(sparse_slice_grad_rows, LF_ISA)(const SparseSliceRows& a, int64_t begin, int64_t end) {
  with_row_dtype(a.dtype, [&](auto tag) { SparseRow<decltype(tag)>::slice_grad(a, begin, end); });
}
#else
void LF_CAT(kd_rows, LF_ISA)(const KDRows& a, int64_t begin, int64_t end) { kd_rows_default(a, begin, end); }
void LF_CAT(pseudo_label_rows, LF_ISA)(const PseudoLabelRows& a, int64_t begin, int64_t end) {
  pseudo_label_rows_default(a, begin, end);
}
StepFaults LF_CAT(adversarial_step, LF_ISA)(const StepBuffers& a, int64_t begin, int64_t end) {
  return adversarial_step_default(a, begin, end);
}
void LF_CAT(sparse_kd_rows, LF_ISA)(const SparseRows& a, int64_t begin, int64_t end) {
  sparse_kd_rows_default(a, begin, end);
}
void LF_CAT(sparse_slice_stats_rows, LF_ISA)(const SparseSliceRows& a, int64_t begin, int64_t end) {
  sparse_slice_stats_rows_default(a, begin, end);
}
void LF_CAT(sparse_slice_grad_rows, LF_ISA)(const SparseSliceRows& a, int64_t begin, int64_t end) {
  sparse_slice_grad_rows_default(a, begin, end);
}
#endif

}  // namespace cpu
}  // namespace lepton_fast
