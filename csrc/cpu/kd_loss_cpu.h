// The interface between kd_loss.cpp (tensor checks, allocation, threads) and the row
// kernel, which is compiled once per CPU capability (kd_loss_rows_<isa>.cpp) and chosen at
// run time. Only baseline headers here: the ISA files include this before they switch the
// instruction set, so nothing shared gets compiled for AVX2/AVX-512.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../kd_loss.h"

namespace lepton_fast {
namespace cpu {

struct KDRows {
  const void* student;  // [N, C] rows of `dtype`, row strides below, unit stride along C
  const void* teacher;
  const int64_t* labels;  // [N] or nullptr
  void* grad;  // [N, C] contiguous, `dtype`; nullptr unless p.compute_grad
  void* loss;  // [N], float32 (float64 for float64 inputs)
  int64_t n_classes;
  int64_t s_stride;
  int64_t t_stride;
  c10::ScalarType dtype;
  KDParams p;
  double grad_scale;  // multiplies the gradient: 1 / the divisor of a mean, else 1
};

// Rows [begin, end) of `a`; one function per instruction set, all with the same results up
// to rounding.
void kd_rows_default(const KDRows& a, int64_t begin, int64_t end);
void kd_rows_avx2(const KDRows& a, int64_t begin, int64_t end);
void kd_rows_avx512(const KDRows& a, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace lepton_fast
