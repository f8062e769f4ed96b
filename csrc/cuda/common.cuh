// What the CUDA kernels share: 16-byte vector loads and stores, and block-wide reductions of
// any mergeable statistic (online softmax statistics, arg-max, sums).
#pragma once

#include <cstdint>
#include <type_traits>

namespace lepton_fast {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 1024 / kWarp;

// kVec elements of scalar_t, loaded and stored as one 16-byte (or narrower) transaction.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, kVec>*>(p);
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, kVec>& x) {
  *reinterpret_cast<Pack<scalar_t, kVec>*>(p) = x;
}

// Whether rows of `row_stride` elements starting at `ptr` all start on a 16-byte boundary,
// so that every Pack of 16 bytes along a row is aligned.
template <typename scalar_t>
inline bool rows_aligned16(const void* ptr, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * int64_t(sizeof(scalar_t))) % 16 == 0;
}

// A running sum, as a statistic block_reduce can merge.
template <typename acc_t>
struct Sum {
  acc_t value = 0;
  __device__ __forceinline__ void merge(const Sum& o) { value += o.value; }
};

template <typename acc_t>
__device__ __forceinline__ Sum<acc_t> shfl_xor(const Sum<acc_t>& a, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, a.value, lane_mask)};
}

// Every thread gets the merge of the whole block's values, in a fixed tree (so the result is
// deterministic). T provides merge(const T&), and shfl_xor(const T&, int) is overloaded for
// it. blockDim.x is a multiple of 32. Safe to call repeatedly: the shared buffer is not
// rewritten before every thread has read the previous result.
template <typename T>
__device__ T block_reduce(T v) {
  __shared__ alignas(T) unsigned char storage[sizeof(T) * kMaxWarps];
  T* partial = reinterpret_cast<T*>(storage);
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v.merge(shfl_xor(v, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  if (n_warps == 1) return v;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < n_warps ? partial[lane] : T{};
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) w.merge(shfl_xor(w, offset));
    if (lane == 0) partial[0] = w;
  }
  __syncthreads();
  return partial[0];
}

// Calls launch(kVec', kThreads') (std::integral_constants) with the launch shape of the
// one-block-per-row kernels: packs of kVec elements when `vec` (every row 16-byte aligned and
// a multiple of kVec long), else one element; 1024 threads for rows of 8192 columns or more,
// else 128, so that more of the narrow rows share an SM.
template <int kVec, typename F>
void launch_row_blocks(bool vec, int64_t n_classes, F&& launch) {
  using Narrow = std::integral_constant<int, 128>;
  using Wide = std::integral_constant<int, 1024>;
  using Packed = std::integral_constant<int, kVec>;
  using Single = std::integral_constant<int, 1>;
  const bool wide = n_classes >= 8192;
  if (vec && wide) {
    launch(Packed{}, Wide{});
  } else if (vec) {
    launch(Packed{}, Narrow{});
  } else if (wide) {
    launch(Single{}, Wide{});
  } else {
    launch(Single{}, Narrow{});
  }
}

}  // namespace cuda
}  // namespace lepton_fast
