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
  static V log1p(V x) { return x.log1p(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V zero_where_zero(V p, V x) { return V::blendv(x, V(0), p == V(0)); }
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
    alignas(64) acc_t buf[W];
    for (int64_t i = 0; i < W; ++i) buf[i] = i < n ? acc_t(p[i]) : pad;
    return Vec::loadu(buf);
  }

  static void store(scalar_t* p, const Vec& v, int64_t n) {
    if (n == W) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        v.store(p);
      } else {
        at::vec::convert_from_float<scalar_t>(v, v).store(p, W);
      }
      return;
    }
    alignas(64) acc_t buf[W];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }

  static acc_t sum(const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, v);
  }

  // Lane statistics -> row: the max (NaN if any lane saw a NaN), the sum of exp(z - max)
  // and the sum `a` rescaled alongside it (0 * inf = 0 for a lane whose factor underflows).
  // One vector exp for the W lanes: at small C (a classifier's 10 classes) this merge is a
  // large part of a row's work.
  static void merge(const Vec& m, const Vec& s, const Vec& a, acc_t& m_row, acc_t& s_row, acc_t& a_row) {
    m_row = at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, m);
    const Vec f = (m - Vec(m_row)).exp();
    s_row = sum(s * f);
    a_row = sum(VecMath<acc_t>::zero_where_zero(f, a * f));
  }
};

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
