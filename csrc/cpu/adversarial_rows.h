// The step kernel of fgsm_perturb and pgd_step, vectorised with at::vec. Each isa_<isa>.cpp
// includes it once (through isa_kernels.h), after choosing the instruction set and
// CPU_CAPABILITY; the code below is in an anonymous namespace, so the copies never meet at
// link time.
//
// A range of the flat buffers is cut into segments on which every operand (csrc/adversarial.h)
// is either one constant (a 0-d value, a sample's or a channel's eps) or a contiguous run of
// values (an operand of x's own shape). Constants are broadcast once per segment; only when
// some operand streams does the loop branch per vector on how to read it. bfloat16 / float16
// are widened to float32 and rounded once at the store.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "adversarial_cpu.h"

namespace lepton_fast {
namespace cpu {
namespace {

template <typename acc_t>
struct StepVecOps {
  using V = at::vec::Vectorized<acc_t>;
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static V any_of(const V& a, const V& b) { return a | b; }
  static V all_of(const V& a, const V& b) { return a & b; }
  static V abs(const V& v) { return v.abs(); }
};

template <typename scalar_t>
struct StepIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();

  // n <= W elements in acc_t; the other lanes 0, which no fault test flags.
  static Vec load(const scalar_t* p, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p, n);
    } else {
      if (n == W) {
        Vec v;
        at::vec::load_to_float(p, v);
        return v;
      }
      alignas(64) acc_t buf[W] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = acc_t(p[i]);
      return Vec::loadu(buf);
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, n);
    } else {
      if (n == W) {
        at::vec::convert_from_float<scalar_t>(v, v).store(p, W);
        return;
      }
      alignas(64) acc_t buf[W];
      v.store(buf);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }

  // The first lane of a comparison mask that is set, or -1.
  static int64_t first_set(const Vec& mask) {
    const int zero = mask.zero_mask();
    for (int64_t i = 0; i < W; ++i) {
      if (!((zero >> i) & 1)) return i;
    }
    return -1;
  }

  static acc_t lane(const Vec& v, int64_t i) {
    alignas(64) acc_t buf[W];
    v.store(buf);
    return buf[i];
  }
};

// An operand over one segment: the constant `v`, or the values p[0], p[1], ... .
template <typename acc_t>
struct SegmentOperand {
  const acc_t* p;
  at::vec::Vectorized<acc_t> v;
};

// The operand from flat index i on, shortening the segment [i, stop) to where it stays one
// constant (a run) or one contiguous stretch of values (a period of a run-1 operand).
template <typename acc_t>
SegmentOperand<acc_t> enter_segment(const adv::Operand& o, int64_t i, int64_t& stop) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (o.data == nullptr) return {nullptr, Vec(acc_t(o.value))};
  const auto* data = static_cast<const acc_t*>(o.data);
  if (o.run == 1) {
    const int64_t q = i % o.period;
    stop = std::min(stop, i - q + o.period);
    return {data + q, Vec(acc_t(0))};
  }
  const int64_t q = i / o.run;
  stop = std::min(stop, (q + 1) * o.run);
  return {nullptr, Vec(data[q % o.period])};
}

template <typename scalar_t, bool kPgd, bool kClamp, bool kStream>
StepFaults step_impl(const StepBuffers& a, int64_t begin, int64_t end) {
  using IO = StepIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Ops = StepVecOps<acc_t>;
  constexpr int64_t W = IO::W;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* orig = static_cast<const scalar_t*>(a.orig);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  auto* out = static_cast<scalar_t*>(a.out);
  const Vec limit(acc_t(a.args.limit)), finite(std::numeric_limits<acc_t>::max());
  StepFaults faults;
  auto value_of = [](const SegmentOperand<acc_t>& o, int64_t k, int64_t n) {
    if constexpr (kStream) {
      if (o.p != nullptr) return Vec::loadu(o.p + k, n);
    }
    return o.v;
  };
  for (int64_t i = begin; i < end;) {
    int64_t stop = end;
    const SegmentOperand<acc_t> step = enter_segment<acc_t>(a.args.step, i, stop);
    const SegmentOperand<acc_t> eps = kPgd ? enter_segment<acc_t>(a.args.eps, i, stop) : step;
    SegmentOperand<acc_t> lo{nullptr, Vec(acc_t(0))}, hi = lo;
    if constexpr (kClamp) {
      lo = enter_segment<acc_t>(a.args.lo, i, stop);
      hi = enter_segment<acc_t>(a.args.hi, i, stop);
    }
    for (int64_t j = i; j < stop; j += W) {
      const int64_t n = std::min(W, stop - j), k = j - i;
      const Vec xv = IO::load(x + j, n), gv = IO::load(grad + j, n);
      const Vec sv = value_of(step, k, n), lv = value_of(lo, k, n), hv = value_of(hi, k, n);
      Vec result, input, radius;
      if constexpr (kPgd) {
        input = IO::load(orig + j, n);
        radius = value_of(eps, k, n);
        result = adv::pgd_value<Ops>(xv, input, gv, sv, radius, kClamp, lv, hv);
      } else {
        input = xv;
        radius = sv;
        result = adv::fgsm_value<Ops>(xv, gv, sv, kClamp, lv, hv);
      }
      IO::store(out + j, result, n);
      if (faults.overflow.index < 0) {
        const int64_t l = IO::first_set(adv::overflows<Ops>(result, xv, input, limit, finite));
        if (l >= 0) faults.overflow = {j + l, double(IO::lane(input, l))};
      }
      if constexpr (kClamp) {
        if (faults.outside_box.index < 0) {
          const int64_t l = IO::first_set(adv::outside_box<Ops>(input, radius, lv, hv));
          if (l >= 0) faults.outside_box = {j + l, double(IO::lane(input, l))};
        }
      }
    }
    i = stop;
  }
  return faults;
}

inline bool streams(const adv::Operand& o) { return o.data != nullptr && o.run == 1; }

template <typename scalar_t>
StepFaults step_any_kind(const StepBuffers& a, int64_t begin, int64_t end) {
  const adv::StepArgs& p = a.args;
  const bool stream = streams(p.step) || (a.pgd && streams(p.eps)) || (p.clamp && (streams(p.lo) || streams(p.hi)));
  return BOOL_SWITCH(a.pgd, kPgd, [&] {
    return BOOL_SWITCH(p.clamp, kClamp, [&] {
      return BOOL_SWITCH(stream, kStream, [&] { return step_impl<scalar_t, kPgd, kClamp, kStream>(a, begin, end); });
    });
  });
}

// adversarial.cpp has checked the dtype; any other leaves the range unwritten.
inline StepFaults adversarial_step_any_dtype(const StepBuffers& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return step_any_kind<float>(a, begin, end);
    case c10::ScalarType::Double: return step_any_kind<double>(a, begin, end);
    case c10::ScalarType::BFloat16: return step_any_kind<c10::BFloat16>(a, begin, end);
    case c10::ScalarType::Half: return step_any_kind<c10::Half>(a, begin, end);
    default: return {};
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lepton_fast
