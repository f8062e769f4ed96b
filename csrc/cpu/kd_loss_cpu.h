// The interface between kd_loss.cpp (tensor checks, allocation, threads) and the row
// kernel, which is compiled once per CPU capability (isa_<isa>.cpp) and chosen at run time.
// Only baseline headers here: the ISA files include this before they switch the instruction
// set, so nothing shared gets compiled for AVX2/AVX-512.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../kd_loss.h"

namespace lepton_fast {
namespace cpu {

struct KDRows {
  KDMode mode;  // which op (csrc/kd_loss.h)
  const void* student;  // [N, C] rows of `dtype`, row strides below, unit stride along C
  const void* teacher;
  const int64_t* labels;  // [N] or nullptr; class ids of the whole row
  void* grad;  // [N, C] contiguous, `dtype`; nullptr unless p.compute_grad (kFused, kSlice)
  void* loss;  // [N] acc_t (float32; float64 for float64 inputs): the row losses (kFused, kSlice)
  const void* stats;  // [N, kNumKDStats] acc_t: each row's merged statistics (kJSDSums, kSlice)
  const void* jsd;  // [N, 2] acc_t: each row's K_t, K_s (kSlice with JSD)
  void* out;  // kStats: [N, kNumKDStats] acc_t; kJSDSums: [N, 2] acc_t
  int64_t slice_classes;  // C, the columns read: the whole row, or a slice of it
  int64_t class_offset;  // the slice's first column in the row (0 for kFused)
  int64_t n_classes;  // the columns of the whole row (C for kFused)
  int64_t s_stride;
  int64_t t_stride;
  c10::ScalarType dtype;
  KDParams p;
  double grad_scale;  // multiplies the gradient: 1 / the divisor of a mean, else 1
  bool stream_grad;  // write the gradient with non-temporal stores: it is far larger than the caches
};

// Rows [begin, end) of `a`; one function per instruction set, all with the same results up
// to rounding.
void kd_rows_default(const KDRows& a, int64_t begin, int64_t end);
void kd_rows_avx2(const KDRows& a, int64_t begin, int64_t end);
void kd_rows_avx512(const KDRows& a, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace lepton_fast
