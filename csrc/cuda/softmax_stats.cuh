// The warp exchanges that cuda::block_reduce (common.cuh) needs to merge the online softmax
// statistics of csrc/kd_loss.h across a block; declared beside the statistics' types, where
// block_reduce finds them by argument-dependent lookup. The KD kernels (kd_loss.cu,
// sparse_kd_loss.cu) share them.
#pragma once

#include "../kd_loss.h"

namespace lepton_fast {

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> shfl_xor(const SoftmaxStats<acc_t>& a, int lane_mask) {
  SoftmaxStats<acc_t> o = a;  // the same scale in every thread
  o.max = __shfl_xor_sync(0xffffffffu, a.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, a.sum, lane_mask);
  return o;
}

template <typename acc_t>
__device__ __forceinline__ KLSums<acc_t> shfl_xor(const KLSums<acc_t>& a, int lane_mask) {
  KLSums<acc_t> o;
  o.p = shfl_xor(a.p, lane_mask);
  o.q = shfl_xor(a.q, lane_mask);
  o.a = __shfl_xor_sync(0xffffffffu, a.a, lane_mask);
  return o;
}

}  // namespace lepton_fast
