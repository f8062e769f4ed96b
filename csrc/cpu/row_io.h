// What the CPU row kernels (<op>_rows.h) share: loads and stores of one SIMD vector of a row
// in the accumulation type (any of the four dtypes, a ragged tail padded), the vector math
// policy of the formulas in csrc/<op>.h, and the merge of lane-wise softmax statistics.
// Compiled once per instruction set with the row kernels (isa_kernels.h); anonymous
// namespace, so that no copy is shared between instruction sets.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace lepton_fast {
namespace cpu {
namespace {

template <typename acc_t>
struct VecMath {
  using V = at::vec::Vectorized<acc_t>;
  static V exp(V x) { return x.exp_u20(); }
  // log1p on [0, 1], the only range the formulas take it on (the mixture's log1p(exp(lo - hi)),
  // lo <= hi). Sleef's log1pf costs about 17 cycles an element, five exp_u20s: it made JSD's
  // passes 15x slower than the KL divergences'. For float: 1 + x = 2^e (1 + f) with e in
  // {0, 1} and f in [1/sqrt2 - 1, sqrt2 - 1], and log1p(f) = 2 atanh(s), s = f / (2 + f),
  // |s| <= 0.172, whose odd series to s^9 leaves a truncation error below 2e-9 (relative).
  static V log1p(V x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      const V upper = x > V(0.41421356f);  // 1 + x > sqrt(2): halve it
      const V f = V::blendv(x, (x - V(1.f)) * V(0.5f), upper);
      const V e_ln2 = V::blendv(V(0.f), V(0.69314718f), upper);
      const V s = f / (f + V(2.f)), z = s * s;
      V series = at::vec::fmadd(z, V(1.f / 9), V(1.f / 7));
      series = at::vec::fmadd(z, series, V(1.f / 5));
      series = at::vec::fmadd(z, series, V(1.f / 3));
      series = at::vec::fmadd(z, series, V(1.f));
      return at::vec::fmadd(s + s, series, e_ln2);
    } else {
      return x.log1p();
    }
  }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  // The running max of a row's raw inputs, NaN from a NaN input on: the row's max is what
  // decides that its softmax is undefined (softmax_defined in common.h). The one-instruction
  // max (clamp_min) dropped a NaN, and the vector exp turns NaN into ~3.4e38 or inf, not NaN:
  // a NaN logit gave a loss of +inf, not the error the other kernels raise.
  static V running_max(V m, V x) { return at::vec::maximum(m, x); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V zero_where_zero(V p, V x) { return x & (p != V(0)); }
  static V keep_neg_inf(V h, V x) {
    return V::blendv(x, h, h == V(-std::numeric_limits<acc_t>::infinity()));
  }
};

template <typename scalar_t>
struct RowIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();

  // W elements at p in acc_t, or the first n < W of them and `pad` in the other lanes.
  static Vec load(const scalar_t* p, int64_t n, acc_t pad) {
    if (n == W) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        return Vec::loadu(p);
      } else {
        Vec v;
        at::vec::load_to_float(p, v);
        return v;
      }
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, acc_t>) return masked_load(p, n, pad);
#endif
    alignas(64) acc_t buf[W];
    for (int64_t i = 0; i < W; ++i) buf[i] = i < n ? acc_t(p[i]) : pad;
    return Vec::loadu(buf);
  }

  // The first n < W lanes, or all W; streaming: a full vector with store_streaming.
  static void store(scalar_t* p, const Vec& v, int64_t n, bool streaming = false) {
    if (n == W && streaming) return store_streaming(p, v);
    if (n == W) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        v.store(p);
      } else {
        at::vec::convert_from_float<scalar_t>(v, v).store(p, W);
      }
      return;
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, acc_t>) return masked_store(p, v, n);
#endif
    alignas(64) acc_t buf[W];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // A row's ragged tail (the whole row at a classifier's 10 classes, below one AVX-512 vector)
  // with the instruction set's masked moves, which never touch the lanes masked out: the copy
  // through a buffer above, lane by lane, was about a third of a 10-class row's time
  // (benchmarks/RESULTS.md, "Per-call cost at tiny shapes"). float32 and float64 only.
#if defined(CPU_CAPABILITY_AVX512)
  static Vec masked_load(const acc_t* p, int64_t n, acc_t pad) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return _mm512_mask_loadu_ps(_mm512_set1_ps(pad), static_cast<__mmask16>((1u << n) - 1), p);
    } else {
      return _mm512_mask_loadu_pd(_mm512_set1_pd(pad), static_cast<__mmask8>((1u << n) - 1), p);
    }
  }
  static void masked_store(acc_t* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<acc_t, float>) {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
    } else {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), v);
    }
  }
#else
  // All ones in the lanes below n, as vmaskmov and blendv read a mask (each lane's top bit).
  static __m256i lanes_below(int64_t n) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    } else {
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    }
  }
  static Vec masked_load(const acc_t* p, int64_t n, acc_t pad) {
    const __m256i m = lanes_below(n);
    if constexpr (std::is_same_v<acc_t, float>) {
      return _mm256_blendv_ps(_mm256_set1_ps(pad), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
    } else {
      return _mm256_blendv_pd(_mm256_set1_pd(pad), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
    }
  }
  static void masked_store(acc_t* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<acc_t, float>) {
      _mm256_maskstore_ps(p, lanes_below(n), v);
    } else {
      _mm256_maskstore_pd(p, lanes_below(n), v);
    }
  }
#endif
#endif

  // v with delta added to its lane `lane` (the one-hot term of a label among a vector's columns).
  static Vec add_at(const Vec& v, int64_t lane, acc_t delta) {
    alignas(64) acc_t buf[W];
    v.store(buf);
    buf[lane] += delta;
    return Vec::loadu(buf);
  }

  // A full vector at p, bypassing the caches (a non-temporal store) where p is aligned to a
  // vector: for an output far larger than the caches, this saves reading every line in before
  // it is overwritten. float32 and float64 on AVX2/AVX-512; a plain store elsewhere. The
  // writing thread calls streaming_fence() before its results are read.
  static void store_streaming(scalar_t* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (reinterpret_cast<uintptr_t>(p) % sizeof(Vec) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, float>) return _mm512_stream_ps(p, v);
      if constexpr (std::is_same_v<scalar_t, double>) return _mm512_stream_pd(p, v);
#else
      if constexpr (std::is_same_v<scalar_t, float>) return _mm256_stream_ps(p, v);
      if constexpr (std::is_same_v<scalar_t, double>) return _mm256_stream_pd(p, v);
#endif
    }
#endif
    store(p, v, W, false);
  }

  // Vectors by value here and in merge: a reference to a loop's accumulator that reaches
  // vec_reduce_all (not inlined) makes GCC keep the accumulator in memory, stored on every
  // iteration (with the one-instruction running max, this took the KD kernel's in-cache time
  // from 55 to 40 ms at 2048 x 32000, benchmarks/RESULTS.md).
  static acc_t sum(Vec v) {
    return at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, v);
  }

  // Lane statistics -> row: the max of the raw logits (NaN if any lane saw a NaN) and the sum
  // of exp((x - max) * scale). Returns the lanes' factors exp((m - max) * scale), which carry
  // any other lane-wise sum over to the row's max. One vector exp for the W lanes: at small C
  // (a classifier's 10 classes) this merge is a large part of a row's work.
  static Vec merge(Vec m, Vec s, acc_t scale, acc_t& m_row, acc_t& s_row) {
    m_row = at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, m);
    const Vec f = VecMath<acc_t>::exp((m - Vec(m_row)) * Vec(scale));
    s_row = sum(s * f);
    return f;
  }
};

// Orders this thread's store_streaming writes before whatever it writes next (the end of its
// parallel task): non-temporal stores are weakly ordered.
inline void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// A row's first pass reads it from memory, two or three streams per thread, and does enough
// work per vector that the hardware prefetchers alone leave it waiting on memory: a hint
// this far ahead (measured at 2, 4 and 8 KiB on the 2-core VM, benchmarks/RESULTS.md) hides
// the latency. Past the end of a row it fetches the next row's start; past the end of the
// tensor it is a no-op (a prefetch never faults).
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// f(scalar_t{}) for the row kernels' four dtypes; the <op>.cpp callers have checked the
// dtype, so any other does nothing (and leaves the rows unwritten).
template <typename F>
void with_row_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: return;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lepton_fast
