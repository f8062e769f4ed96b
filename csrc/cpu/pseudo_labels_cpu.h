// The interface between pseudo_labels.cpp (tensor checks, allocation, threads, the checks of
// the rows and the reduction) and the row kernel of select_pseudo_labels and
// fused_pseudo_label_loss, which is compiled once per CPU capability (isa_<isa>.cpp) and
// chosen at run time. Only baseline headers here: the ISA files include this before they
// switch the instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../pseudo_labels.h"

namespace lepton_fast {
namespace cpu {

struct PseudoLabelRows {
  const void* strong;  // [N, C] rows of `dtype`, unit stride along C; nullptr: select only
  const void* weak;  // [N, C] rows of `dtype`
  const void* class_thresholds;  // [C] of the accumulation type (float32; float64 for float64), or nullptr
  const void* weights;  // [N] of the accumulation type, or nullptr
  void* grad;  // [N, C] contiguous, `dtype`; nullptr unless p.compute_grad
  void* loss;  // [N] of the accumulation type (nullptr: select only)
  int64_t* labels;  // [N]
  void* confidence;  // [N] of the accumulation type
  bool* mask;  // [N]
  int64_t n_classes;
  int64_t strong_stride;
  int64_t weak_stride;
  c10::ScalarType dtype;
  PseudoLabelParams p;
  bool stream_grad;  // write the gradient with non-temporal stores (grad_buffer.h, stream_gradient)
};

// Rows [begin, end) of `a`; one function per instruction set, all with the same results up
// to rounding.
void pseudo_label_rows_default(const PseudoLabelRows& a, int64_t begin, int64_t end);
void pseudo_label_rows_avx2(const PseudoLabelRows& a, int64_t begin, int64_t end);
void pseudo_label_rows_avx512(const PseudoLabelRows& a, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace lepton_fast
