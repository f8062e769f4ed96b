// The warp exchange that cuda::block_reduce (common.cuh) needs to merge the online softmax
// statistics of csrc/kd_loss.h across a block; declared beside the statistic's type, where
// block_reduce finds it by argument-dependent lookup. The KD kernels (kd_loss.cu,
// sparse_kd_loss.cu) share it.
#pragma once

#include "../kd_loss.h"

namespace lepton_fast {

template <typename acc_t>
__device__ __forceinline__ WeightedSoftmaxStats<acc_t> shfl_xor(const WeightedSoftmaxStats<acc_t>& a, int lane_mask) {
  WeightedSoftmaxStats<acc_t> o = a;  // the same scale in every thread
  o.max = __shfl_xor_sync(0xffffffffu, a.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, a.sum, lane_mask);
  o.weighted = __shfl_xor_sync(0xffffffffu, a.weighted, lane_mask);
  return o;
}

}  // namespace lepton_fast
