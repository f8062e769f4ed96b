// The interface between sparse_kd_loss.cpp (tensor checks, allocation, threads) and its row
// kernel, which is compiled once per CPU capability (isa_<isa>.cpp) and chosen at run time.
// Only baseline headers here: the ISA files include this before they switch the instruction
// set, so nothing shared gets compiled for AVX2/AVX-512.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../sparse_kd_loss.h"

namespace lepton_fast {
namespace cpu {

struct SparseRows {
  const void* student;  // [N, V] rows of `dtype`, row stride s_stride, unit stride along V
  const int64_t* indices;  // [N, K] contiguous
  const void* logprobs;  // [N, K] contiguous, in the accumulation dtype
  const bool* mask;  // [N, K] contiguous, or nullptr
  const int64_t* labels;  // [N], or nullptr
  void* grad;  // [N, V] contiguous, `dtype`; nullptr unless p.compute_grad
  void* rows;  // [N] acc_t: the row losses
  int64_t n_classes, k, s_stride;
  c10::ScalarType dtype;
  bool tail;  // truncation="tail"
  bool stream_grad;  // write the gradient with non-temporal stores (grad_buffer.h, stream_gradient)
  double grad_scale;  // multiplies the gradient: 1 / the divisor of a mean, else 1
  KDParams p;
};

// The rows of the slice ops sparse_slice_stats and sparse_slice_grad: the [N, C] slice of rows of
// n_classes at class_offset, one pass over it each (csrc/sparse_kd_loss.h's SparseStat and
// SparseGradCoef name the columns of their [N, K + ...] tensors).
struct SparseSliceRows {
  const void* student;  // [N, C] rows of `dtype`, row stride s_stride, unit stride along C
  const int64_t* column;  // [N, K] contiguous: a counted entry's column in [0, C), or -1
  const int64_t* labels;  // [N], or nullptr
  const void* coefficients;  // [N, kGrEntries + K] acc_t (sparse_slice_grad), else nullptr
  void* out;  // [N, kSpEntries + K] acc_t (sparse_slice_stats), or [N, C] `dtype` (sparse_slice_grad)
  int64_t slice_classes, k, s_stride, class_offset, n_classes;
  c10::ScalarType dtype;
  bool tail;  // truncation="tail"
  bool stream_grad;  // write the gradient with non-temporal stores (grad_buffer.h, stream_gradient)
  KDParams p;
};

// Rows [begin, end) of `a`; one function per instruction set, all with the same results up
// to rounding.
void sparse_kd_rows_default(const SparseRows& a, int64_t begin, int64_t end);
void sparse_kd_rows_avx2(const SparseRows& a, int64_t begin, int64_t end);
void sparse_kd_rows_avx512(const SparseRows& a, int64_t begin, int64_t end);
void sparse_slice_stats_rows_default(const SparseSliceRows& a, int64_t begin, int64_t end);
void sparse_slice_stats_rows_avx2(const SparseSliceRows& a, int64_t begin, int64_t end);
void sparse_slice_stats_rows_avx512(const SparseSliceRows& a, int64_t begin, int64_t end);
void sparse_slice_grad_rows_default(const SparseSliceRows& a, int64_t begin, int64_t end);
void sparse_slice_grad_rows_avx2(const SparseSliceRows& a, int64_t begin, int64_t end);
void sparse_slice_grad_rows_avx512(const SparseSliceRows& a, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace lepton_fast
