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
#include <tuple>

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

// Blocks of kBlock elements as kVecs vectors of acc_t: one vector for float and double, two for
// bfloat16 / float16, whose Vectorized holds 2W elements, so that each block is one load and
// one store of the 16-bit type and one conversion each way.
template <typename scalar_t>
struct StepIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kVecs = kSame ? 1 : 2;
  static constexpr int64_t kBlock = kVecs * W;

  // n <= kBlock elements; the other lanes 0, which no fault test flags.
  static void load(const scalar_t* p, int64_t n, Vec (&v)[kVecs]) {
    if constexpr (kSame) {
      v[0] = Vec::loadu(p, n);
    } else {
      if (n == kBlock) {
        std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
        return;
      }
      alignas(64) acc_t buf[kBlock] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = acc_t(p[i]);
      v[0] = Vec::loadu(buf);
      v[1] = Vec::loadu(buf + W);
    }
  }

  static void store(scalar_t* p, const Vec (&v)[kVecs], int64_t n) {
    if constexpr (kSame) {
      v[0].store(p, n);
    } else {
      if (n == kBlock) {
        at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
        return;
      }
      alignas(64) acc_t buf[kBlock];
      v[0].store(buf);
      v[1].store(buf + W);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }

  // The first lane of a comparison mask that is set, or -1: one test per vector when none is
  // (the rule), the lanes only once a fault is found.
  static int64_t first_set(const Vec& mask) {
    const int64_t set = ~int64_t(mask.zero_mask()) & ((int64_t(1) << W) - 1);
    if (set == 0) return -1;
    int64_t i = 0;
    while (!((set >> i) & 1)) ++i;
    return i;
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
    for (int64_t j = i; j < stop; j += IO::kBlock) {
      const int64_t n = std::min(IO::kBlock, stop - j);
      Vec xs[IO::kVecs], gs[IO::kVecs], os[IO::kVecs], results[IO::kVecs];
      IO::load(x + j, n, xs);
      IO::load(grad + j, n, gs);
      if constexpr (kPgd) IO::load(orig + j, n, os);
      for (int64_t h = 0; h < IO::kVecs; ++h) {
        // this vector's W lanes: elements j + h W ... of the block, m of them real
        const int64_t k = j - i + h * W, m = std::max<int64_t>(0, std::min(W, n - h * W));
        const Vec sv = value_of(step, k, m), lv = value_of(lo, k, m), hv = value_of(hi, k, m);
        Vec input = xs[h], radius = sv;
        if constexpr (kPgd) {
          input = os[h];
          radius = value_of(eps, k, m);
          results[h] = adv::pgd_value<Ops>(xs[h], input, gs[h], sv, radius, kClamp, lv, hv);
        } else {
          results[h] = adv::fgsm_value<Ops>(xs[h], gs[h], sv, kClamp, lv, hv);
        }
        if (faults.overflow.index < 0) {
          const int64_t l = IO::first_set(adv::overflows<Ops>(results[h], xs[h], input, limit, finite));
          if (l >= 0) faults.overflow = {j + h * W + l, double(IO::lane(input, l))};
        }
        if (kClamp && faults.outside_box.index < 0) {
          const int64_t l = IO::first_set(adv::outside_box<Ops>(input, radius, lv, hv));
          if (l >= 0) faults.outside_box = {j + h * W + l, double(IO::lane(input, l))};
        }
      }
      IO::store(out + j, results, n);
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
