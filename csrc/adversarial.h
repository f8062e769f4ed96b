// Adversarial perturbation steps: the per-element math shared by the CPU kernel (on at::vec
// vectors of float / double) and the CUDA kernel (on an IEEE float32 wrapper / double), and
// the host-side description of their broadcast operands.
//   sign(g)  = [g > 0] - [g < 0]             (0 for 0 and NaN, as torch.sign)
//   clamp(v) = min(max(v, lo), hi)           keeping v when it equals a bound, NaN propagated
//   fgsm     = clamp(x + eps * sign(g))
//   pgd      = clamp(x_orig + clamp(x_adv + step * sign(g) - x_orig, -eps, eps))
// The operations and their order are those of the eager torch composition (torchattacks'
// PGD), so that float32 results are bit-identical to it. step * sign(g) is exact (0 or
// +-step), so contracting it with the addition into an FMA cannot change a bit; the other
// operations are separate roundings that no compiler contracts.
//
// Two faults are found where the data is read (the Python layer cannot see them without a
// pass of its own), and reported by the CPU kernel as ValueError, by the CUDA kernel as a
// device assertion:
//   - the input (fgsm: x, pgd: x_orig) lies farther than eps outside [lo, hi]: clamping would
//     move the result by more than eps from it, breaking the L-inf promise. The usual cause is
//     a normalised image clamped to the [0, 1] box of raw pixels.
//   - a finite input whose result is not finite in its dtype: eps (or step_size) beyond the
//     dtype's range, float16's 65504 say.
#pragma once

#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "common.h"

// The fix the outside-the-box fault suggests, shared by the CPU message and the CUDA assertion.
#define LF_ADV_BOX_FIX                                                                                    \
  "If the input is a normalised image ((image - mean) / std), its box is ((0 - mean) / std, (1 - mean) " \
  "/ std) per channel: pass clamp=(lo, hi) with tensors of shape [C, 1, 1], or clamp=None for inputs "    \
  "without bounds."

namespace lepton_fast {
namespace adv {

// A broadcast operand (eps, step_size, a clamp bound) as the kernels read it. A tensor that
// broadcasts to x varies over a window of consecutive dims of x and is constant over the dims
// before and after it, so value(i) = data[(i / run) % period] at the flat index i of x, where
// run is the product of the sizes after the window and period the window's size; runs nest, so
// an operand is constant on every aligned run of `run` elements. A 0-d CPU tensor is the
// constant `value` (data null). data points to the opmath type of x (float; double for double).
struct Operand {
  const void* data;
  double value;
  int64_t run;
  int64_t period;
};

// The operands of one call and the largest opmath value that rounds to a finite scalar_t.
struct StepArgs {
  Operand step;  // fgsm: eps
  Operand eps;  // pgd: the radius; fgsm: step again (its radius is its step)
  Operand lo, hi;  // when clamp
  bool clamp;
  double limit;
};

// The arithmetic the math below needs from its vector type V, as a policy: V(0.0f) is a
// broadcast constant, comparisons give a mask, Ops::where(mask, a, b) selects, Ops::any_of and
// Ops::all_of combine masks, Ops::abs is |v|.
template <typename Ops, typename V>
LF_HOST_DEVICE V sign_of(V g) {
  const V zero(0.0f), one(1.0f);
  return Ops::where(zero < g, one, zero) - Ops::where(g < zero, one, zero);
}

template <typename Ops, typename V>
LF_HOST_DEVICE V clamp_keep(V v, V lo, V hi) {
  v = Ops::where(v < lo, lo, v);  // NaN compares false: kept
  return Ops::where(hi < v, hi, v);
}

template <typename Ops, typename V>
LF_HOST_DEVICE V fgsm_value(V x, V g, V eps, bool clamp, V lo, V hi) {
  const V out = x + eps * sign_of<Ops>(g);
  return clamp ? clamp_keep<Ops>(out, lo, hi) : out;
}

template <typename Ops, typename V>
LF_HOST_DEVICE V pgd_value(V x_adv, V x_orig, V g, V step, V eps, bool clamp, V lo, V hi) {
  const V stepped = x_adv + step * sign_of<Ops>(g);
  const V out = x_orig + clamp_keep<Ops>(stepped - x_orig, -eps, eps);
  return clamp ? clamp_keep<Ops>(out, lo, hi) : out;
}

// The first fault: `input` farther than `radius` outside [lo, hi] (NaN is no fault).
template <typename Ops, typename V>
LF_HOST_DEVICE auto outside_box(V input, V radius, V lo, V hi) {
  return Ops::any_of(input + radius < lo, hi < input - radius);
}

// The second: a result beyond `limit` from inputs that are finite (`finite` = the largest
// finite opmath value). NaN results come only from NaN inputs, and are no fault.
template <typename Ops, typename V>
LF_HOST_DEVICE auto overflows(V out, V input, V other_input, V limit, V finite) {
  return Ops::all_of(Ops::all_of(limit < Ops::abs(out), Ops::abs(input) <= finite), Ops::abs(other_input) <= finite);
}

// --- host side ---------------------------------------------------------------------------------

// The largest opmath value that rounds to a finite value of `dtype` (round to nearest even):
// just below max + half an ulp for float16 (65504 + 16) and bfloat16 (255 * 2^120 + 2^119), the
// max itself for float and double.
inline double finite_limit(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return std::nextafter(65504.0f + 16.0f, 0.0f);
    case at::kBFloat16: return std::nextafter(std::ldexp(255.0f, 120) + std::ldexp(1.0f, 119), 0.0f);
    case at::kFloat: return std::numeric_limits<float>::max();
    default: return std::numeric_limits<double>::max();
  }
}

// An operand tensor described for the kernels; `storage` keeps alive what `op.data` points to
// (the operand itself, contiguous, or its expansion to x's shape).
struct DescribedOperand {
  Operand op;
  at::Tensor storage;
};

// `t` is a 0-d CPU tensor (a constant) or a tensor that broadcasts to x, on x's device, in
// x's opmath dtype. An operand that is constant over a dim between two dims it varies along
// ([N, 1, W] against [N, C, W]) has no (run, period) description and is expanded to x's shape;
// so is one whose constant runs or contiguous periods (run 1) are shorter than `min_segment`
// (the CPU kernel vectorises within them; the CUDA kernel passes 1).
inline DescribedOperand describe_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                                         int64_t min_segment) {
  const int64_t numel = x.numel();
  if (t.dim() == 0 && t.device().is_cpu()) return {{nullptr, scalar_arg(t, name), numel, 1}, at::Tensor()};
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be a 0-d CPU tensor or on x's device (", x.device(),
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::toOpMathType(x.scalar_type()), op, ": ", name, " must be ",
              at::toOpMathType(x.scalar_type()), " (x's opmath dtype), got ", t.scalar_type());
  TORCH_CHECK(at::is_expandable_to(t.sizes(), x.sizes()), op, ": ", name, " of shape ", t.sizes(),
              " does not broadcast to x's shape ", x.sizes());
  int64_t run = 1, period = 1;
  bool closed = false, described = true;
  for (int64_t d = x.dim() - 1; d >= 0; --d) {
    const int64_t size = x.size(d), td = d - (x.dim() - t.dim());
    if (size == 1) continue;
    if (td >= 0 && t.size(td) != 1) {
      described = described && !closed;
      period *= size;
    } else if (period > 1) {
      closed = true;
    } else {
      run *= size;
    }
  }
  const int64_t segment = run == 1 ? period : run;
  if (!described || segment < std::min(min_segment, numel)) {
    at::Tensor full = t.expand(x.sizes()).contiguous();
    return {{full.const_data_ptr(), 0.0, 1, numel}, full};
  }
  at::Tensor dense = t.contiguous();
  return {{dense.const_data_ptr(), 0.0, run, period}, dense};
}

// The value of an operand at flat index i, for messages.
inline double operand_at(const Operand& o, c10::ScalarType opmath, int64_t i) {
  if (o.data == nullptr) return o.value;
  const int64_t q = (i / o.run) % o.period;
  return opmath == at::kDouble ? static_cast<const double*>(o.data)[q] : static_cast<const float*>(o.data)[q];
}

// The tensor checks and operands of one call; min_segment as describe_operand takes it.
inline StepArgs make_step_args(const char* op, const at::Tensor& out, std::initializer_list<const at::Tensor*> inputs,
                               const at::Tensor& step, const at::Tensor* eps, const std::optional<at::Tensor>& lo,
                               const std::optional<at::Tensor>& hi, int64_t min_segment,
                               std::vector<at::Tensor>& keep_alive) {
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": expected float32, float64, bfloat16 or float16, got ", dtype);
  for (const at::Tensor* t : inputs) {
    TORCH_CHECK(t->device() == out.device() && t->sizes() == out.sizes() && t->scalar_type() == dtype &&
                    t->is_contiguous(),
                op, ": every input must be contiguous, on x's device, with x's shape and dtype");
  }
  TORCH_CHECK(lo.has_value() == hi.has_value(), op, ": clamp_min and clamp_max must both be given or both be None");
  auto describe = [&](const char* name, const at::Tensor& t) {
    DescribedOperand d = describe_operand(op, name, t, out, min_segment);
    if (d.storage.defined()) keep_alive.push_back(std::move(d.storage));
    return d.op;
  };
  StepArgs a{};
  a.step = describe(eps == nullptr ? "eps" : "step_size", step);
  a.eps = eps == nullptr ? a.step : describe("eps", *eps);
  a.clamp = lo.has_value();
  if (a.clamp) {
    a.lo = describe("clamp_min", *lo);
    a.hi = describe("clamp_max", *hi);
  }
  a.limit = finite_limit(dtype);
  return a;
}

}  // namespace adv
}  // namespace lepton_fast
