// The row kernel of fused_kd_loss, vectorised with at::vec. Each isa_<isa>.cpp includes it
// once (through isa_kernels.h), after choosing the instruction set and CPU_CAPABILITY; the
// code below is in an anonymous namespace, so the copies never meet at link time.
//
// One row, z = x / T (csrc/kd_loss.h has the formulas):
//   pass 1 reads s and t from memory: lane-wise online softmax statistics of z_s and z_t
//     (and of x_s at T = 1 for the CE term when T != 1) plus the running sum A of
//     kl_from_sums, a chunk of kChunk elements at a time: the chunk's max first (loads from
//     L1, no exp), then one rescale per chunk and one exp per element and distribution.
//     Forward and reverse KL have their loss after this pass.
//   JSD only: a second pass sums KL(p_t || m) and KL(p_s || m), which need both lse first.
//   last pass (s and t now in L2): the gradient, one exp per distribution and element.
// exp is at::vec's exp_u20 (a degree-5 polynomial after range reduction; relative error
// ~1e-6 in float32, inside the 1e-5 tolerance); float64 uses the accurate exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kd_loss_cpu.h"
#include "row_io.h"

namespace lepton_fast {
namespace cpu {
namespace {

enum class Soft { kNone, kForwardKL, kReverseKL, kJSD };

// log-sum-exp from a row's max and sum; NaN for a row that is entirely -inf (sum 0), which
// the Python layer reports as an error.
template <typename acc_t>
acc_t lse_of(acc_t m, acc_t s) {
  return s > 0 ? m + std::log(s) : std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename scalar_t, Soft kSoft, bool kCE>
void rows_impl(const KDRows& a, int64_t begin, int64_t end) {
  using IO = RowIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using M = VecMath<acc_t>;
  constexpr int64_t W = IO::W;
  constexpr int64_t kChunk = 16 * W;
  constexpr bool kHasSoft = kSoft != Soft::kNone;
  const KDParams& p = a.p;
  const int64_t C = a.n_classes;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_t = p.inv_temperature;
  // Without a soft term, or at T != 1, the CE needs its own softmax statistics at T = 1.
  const bool ce_own = kCE && (!kHasSoft || inv_t != acc_t(1));
  const acc_t eps = p.label_smoothing;
  const bool smoothing = kCE && eps > 0;
  const acc_t beta = p.beta;
  const acc_t gs = a.grad_scale;
  const acc_t soft_gw = acc_t(p.soft_grad_weight) * gs, ce_gw = acc_t(p.alpha) * gs;
  const Vec v_inv_t(inv_t), v_lowest(std::numeric_limits<acc_t>::lowest());
  const Vec v_log_beta(std::log(beta)), v_log_1m_beta(std::log1p(-beta));
  auto* loss = static_cast<acc_t*>(a.loss);

  for (int64_t row = begin; row < end; ++row) {
    const auto* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
    const auto* t = static_cast<const scalar_t*>(a.teacher) + row * a.t_stride;
    scalar_t* g = p.compute_grad ? static_cast<scalar_t*>(a.grad) + row * C : nullptr;
    const int64_t label = a.labels ? a.labels[row] : -1;
    if (a.labels && label == p.ignore_index) {
      loss[row] = 0;
      if (g) {
        for (int64_t j = 0; j < C; ++j) g[j] = scalar_t(0);
      }
      continue;
    }

    // Pass 1. Running maxima start at the lowest finite value, never -inf, so that
    // `z - max` and `old max - new max` are never -inf - -inf; padding lanes hold -inf.
    Vec ms = v_lowest, ss(0), mt = v_lowest, st(0), kl_sum(0), m1 = v_lowest, s1(0), sum_x(0);
    for (int64_t j0 = 0; j0 < C; j0 += kChunk) {
      const int64_t j1 = std::min(C, j0 + kChunk);
      Vec cs = ms, ct = mt, c1 = m1;
      for (int64_t j = j0; j < j1; j += W) {
        const int64_t n = std::min(W, j1 - j);
        const Vec xs = IO::load(s + j, n, neg_inf);
        if constexpr (kHasSoft) {
          cs = M::max(cs, xs * v_inv_t);
          ct = M::max(ct, IO::load(t + j, n, neg_inf) * v_inv_t);
        }
        if (ce_own) c1 = M::max(c1, xs);
      }
      if constexpr (kHasSoft) {
        const Vec fs = M::exp(ms - cs), ft = M::exp(mt - ct);
        ss = ss * fs;
        st = st * ft;
        if constexpr (kSoft == Soft::kForwardKL) kl_sum = M::zero_where_zero(ft, kl_sum * ft);
        if constexpr (kSoft == Soft::kReverseKL) kl_sum = M::zero_where_zero(fs, kl_sum * fs);
        ms = cs;
        mt = ct;
      }
      if (ce_own) {
        s1 = s1 * M::exp(m1 - c1);
        m1 = c1;
      }
      for (int64_t j = j0; j < j1; j += W) {
        const int64_t n = std::min(W, j1 - j);
        const Vec xs = IO::load(s + j, n, neg_inf);
        if constexpr (kHasSoft) {
          const Vec xt = IO::load(t + j, n, neg_inf);
          const Vec es = M::exp(xs * v_inv_t - ms), et = M::exp(xt * v_inv_t - mt);
          ss = ss + es;
          st = st + et;
          if constexpr (kSoft == Soft::kForwardKL) kl_sum = kl_sum + weighted<M>(et, (xt - xs) * v_inv_t);
          if constexpr (kSoft == Soft::kReverseKL) kl_sum = kl_sum + weighted<M>(es, (xs - xt) * v_inv_t);
        }
        if (ce_own) s1 = s1 + M::exp(xs - m1);
        if (smoothing) sum_x = sum_x + (n == W ? xs : IO::load(s + j, n, acc_t(0)));
      }
    }

    acc_t lse_s = 0, lse_t = 0, div = 0, grad_const = 0;
    if constexpr (kHasSoft) {
      acc_t m_s, s_s, a_s, m_t, s_t, a_t;
      IO::merge(ms, ss, kSoft == Soft::kReverseKL ? kl_sum : Vec(0), m_s, s_s, a_s);
      IO::merge(mt, st, kSoft == Soft::kForwardKL ? kl_sum : Vec(0), m_t, s_t, a_t);
      lse_s = lse_of(m_s, s_s);
      lse_t = lse_of(m_t, s_t);
      if constexpr (kSoft == Soft::kForwardKL) {
        div = kl_from_sums(a_t, s_t, m_t, s_s, m_s);
      } else if constexpr (kSoft == Soft::kReverseKL) {
        div = kl_from_sums(a_s, s_s, m_s, s_t, m_t);
        grad_const = (lse_s - lse_t) + div;  // d - D = (z_s - z_t) - grad_const
      } else {
        // Pass 2 (JSD): K_t = KL(p_t || m), K_s = KL(p_s || m).
        const Vec v_lse_s(lse_s), v_lse_t(lse_t);
        Vec k_t(0), k_s(0);
        for (int64_t j = 0; j < C; j += W) {
          const int64_t n = std::min(W, C - j);
          const Vec lps = at::vec::fmadd(IO::load(s + j, n, neg_inf), v_inv_t, -v_lse_s);
          const Vec lpt = at::vec::fmadd(IO::load(t + j, n, neg_inf), v_inv_t, -v_lse_t);
          const Vec lm = log_mixture_of<M>(lps, lpt, v_log_beta, v_log_1m_beta);
          k_t = k_t + weighted<M>(M::exp(lpt), lpt - lm);
          k_s = k_s + weighted<M>(M::exp(lps), lps - lm);
        }
        grad_const = IO::sum(k_s);
        div = beta * IO::sum(k_t) + (1 - beta) * grad_const;
      }
      // An entirely -inf (or NaN) row must reach the Python layer as NaN, whatever the sums.
      if (std::isnan(lse_s) || std::isnan(lse_t)) div = std::numeric_limits<acc_t>::quiet_NaN();
    }
    acc_t lse_1 = lse_s;
    acc_t row_loss = kHasSoft ? acc_t(p.soft_weight) * div : acc_t(0);
    if constexpr (kCE) {
      if (ce_own) {
        acc_t m_1, s_1, unused;
        IO::merge(m1, s1, Vec(0), m_1, s_1, unused);
        lse_1 = lse_of(m_1, s_1);
      }
      const acc_t ce = ce_from_sums(lse_1, acc_t(s[label]), smoothing ? IO::sum(sum_x) : acc_t(0), eps, C);
      row_loss += acc_t(p.alpha) * ce;
    }
    loss[row] = row_loss;
    if (!g) continue;

    // Last pass: the gradient, already multiplied by grad_scale.
    const Vec v_lse_s(lse_s), v_lse_t(lse_t), v_lse_1(lse_1), v_grad_const(grad_const);
    const Vec v_soft_gw(kSoft == Soft::kJSD ? (1 - beta) * soft_gw : soft_gw), v_ce_gw(ce_gw);
    const Vec v_smooth(eps / acc_t(C));
    for (int64_t j = 0; j < C; j += W) {
      const int64_t n = std::min(W, C - j);
      const Vec xs = IO::load(s + j, n, neg_inf);
      Vec gv(0), ps(0);
      if constexpr (kHasSoft) {
        const Vec xt = IO::load(t + j, n, neg_inf);
        const Vec lps = at::vec::fmadd(xs, v_inv_t, -v_lse_s);
        ps = M::exp(lps);
        Vec d;
        if constexpr (kSoft == Soft::kForwardKL) {
          d = ps - M::exp(at::vec::fmadd(xt, v_inv_t, -v_lse_t));
        } else if constexpr (kSoft == Soft::kReverseKL) {
          d = weighted<M>(ps, (xs - xt) * v_inv_t - v_grad_const);
        } else {
          const Vec lpt = at::vec::fmadd(xt, v_inv_t, -v_lse_t);
          d = weighted<M>(ps, lps - log_mixture_of<M>(lps, lpt, v_log_beta, v_log_1m_beta) - v_grad_const);
        }
        gv = d * v_soft_gw;
      }
      if constexpr (kCE) {
        const Vec q = ce_own ? M::exp(xs - v_lse_1) : ps;
        gv = at::vec::fmadd(q - v_smooth, v_ce_gw, gv);
        if (label >= j && label < j + n) {
          alignas(64) acc_t buf[W];
          gv.store(buf);
          buf[label - j] -= ce_gw * (1 - eps);
          gv = Vec::loadu(buf);
        }
      }
      IO::store(g + j, gv, n);
    }
  }
}

template <typename scalar_t>
void rows_any_kind(const KDRows& a, int64_t begin, int64_t end) {
  if (!a.p.needs_soft) return rows_impl<scalar_t, Soft::kNone, true>(a, begin, end);
  const bool ce = a.p.needs_ce;
  switch (a.p.divergence) {
    case Divergence::kForwardKL:
      return ce ? rows_impl<scalar_t, Soft::kForwardKL, true>(a, begin, end)
                : rows_impl<scalar_t, Soft::kForwardKL, false>(a, begin, end);
    case Divergence::kReverseKL:
      return ce ? rows_impl<scalar_t, Soft::kReverseKL, true>(a, begin, end)
                : rows_impl<scalar_t, Soft::kReverseKL, false>(a, begin, end);
    case Divergence::kJSD:
      return ce ? rows_impl<scalar_t, Soft::kJSD, true>(a, begin, end)
                : rows_impl<scalar_t, Soft::kJSD, false>(a, begin, end);
  }
}

inline void kd_rows_any_dtype(const KDRows& a, int64_t begin, int64_t end) {
  with_row_dtype(a.dtype, [&](auto tag) { rows_any_kind<decltype(tag)>(a, begin, end); });
}

}  // namespace
}  // namespace cpu
}  // namespace lepton_fast
