// The row kernel of fused_kd_loss and the kd_slice_* ops, vectorised with at::vec. Each
// isa_<isa>.cpp includes it once (through isa_kernels.h), after choosing the instruction set
// and CPU_CAPABILITY; the code below is in an anonymous namespace, so the copies never meet
// at link time.
//
// The steps of a row (csrc/kd_loss.h), z = x / T, as functions of Row below, which
// fused_kd_loss composes per row (so the row is still in cache for the later passes) and
// the slice ops run one at a time:
//   Row::stats reads s and t from memory: lane-wise online softmax statistics of z_s and z_t
//     (and of x_s at T = 1 for the CE term when T != 1) plus the running sum of
//     kl_from_sums, a chunk of kChunk elements at a time: the chunk's max first (the loads
//     from memory, prefetched ahead: row_io.h, prefetch_ahead; no exp), then one rescale per
//     chunk and one exp per element and distribution, from L1. The maxima are of the raw
//     logits and each exponent is (x - max) / T, a subtraction before the multiply by 1 / T
//     (csrc/common.h, log_sum: exact at the max for every T). Forward and reverse KL have
//     their loss after this pass.
//   Row::jsd_sums, JSD only: KL(p_t || m) and KL(p_s || m), which need both lse first.
//   Row::grad (s and t now in L2 when fused): one exp per distribution and element, or,
//     for fused_kd_loss, which keeps the exps of Row::stats in a scratch row per
//     distribution (RowScratch), none: a kept exp(z - m) times its chunk's exp(m - lse) is
//     p. Recomputing them was most of the pass's time. In kd_slice_loss this pass is the
//     call's first over the row, and prefetches. A gradient far larger than the caches is
//     written with non-temporal stores (KDRows::stream_grad).
// exp is at::vec's exp_u20 (a degree-5 polynomial after range reduction; relative error
// ~1e-6 in float32, inside the 1e-5 tolerance); float64 uses the accurate exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <memory>

#include "kd_loss_cpu.h"
#include "row_io.h"

namespace lepton_fast {
namespace cpu {
namespace {

enum class Soft { kNone, kForwardKL, kReverseKL, kJSD };

// Row::stats's exps of z_s, z_t and (the CE's own softmax at T != 1) x_s, kept for Row::grad:
// e = exp((x - m) / T) per column, with m the lane's running max of x in the column's chunk (W
// per chunk). Rows of the thread's task reuse it.
template <typename acc_t>
struct RowScratch {
  acc_t *e_s, *e_t, *e_1;
  acc_t *m_s, *m_t, *m_1;
};

// The steps of one row (csrc/kd_loss.h) on the C columns at s and t, a whole row or a slice
// of it; `label` is the label's column among them, or -1.
template <typename scalar_t, Soft kSoft, bool kCE>
struct Row {
  using IO = RowIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using M = VecMath<acc_t>;
  static constexpr int64_t W = IO::W;
  static constexpr int64_t kChunk = 16 * W;
  static constexpr bool kHasSoft = kSoft != Soft::kNone;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Without a soft term, or at T != 1, the CE needs its own softmax sum at T = 1.
  static bool ce_own(const KDParams& p) { return kCE && (!kHasSoft || acc_t(p.inv_temperature) != acc_t(1)); }

  // Step 1: the statistics of the columns.
  static KDRowStats<acc_t> stats(const scalar_t* s, const scalar_t* t, int64_t C, int64_t label, const KDParams& p,
                                 int64_t n_classes, const RowScratch<acc_t>* keep = nullptr) {
    const acc_t inv_t = p.inv_temperature;
    const bool own = ce_own(p);
    const acc_t label_smoothing = p.label_smoothing;
    const bool smoothing = kCE && label_smoothing > 0;
    const Vec v_inv_t(inv_t), v_lowest(std::numeric_limits<acc_t>::lowest());
    // Running maxima (of the raw logits) start at the lowest finite value, never -inf, so that
    // `x - max` and `old max - new max` are never -inf - -inf; padding lanes hold -inf.
    Vec ms = v_lowest, ss(0), mt = v_lowest, st(0), kl_sum(0), m1 = v_lowest, s1(0), sum_x(0);
    for (int64_t j0 = 0; j0 < C; j0 += kChunk) {
      const int64_t j1 = std::min(C, j0 + kChunk);
      // The chunk's maxima of the raw logits.
      Vec rs = ms, rt = mt, c1 = m1;
      for (int64_t j = j0; j < j1; j += W) {
        const int64_t n = std::min(W, j1 - j);
        const Vec xs = IO::load(s + j, n, kNegInf);
        prefetch_ahead(s + j);
        prefetch_ahead(t + j);
        if constexpr (kHasSoft) {
          rs = M::running_max(rs, xs);
          rt = M::running_max(rt, IO::load(t + j, n, kNegInf));
        }
        if (own) c1 = M::running_max(c1, xs);
      }
      if constexpr (kHasSoft) {
        const Vec cs = rs, ct = rt;  // running maxima from ms, mt: never below them
        const Vec fs = M::exp((ms - cs) * v_inv_t), ft = M::exp((mt - ct) * v_inv_t);
        // The KL sum against the chunk's maxima first, while the sums are still against the old.
        const Vec rise = ((cs - ms) - (ct - mt)) * v_inv_t;  // (rise of max_s - rise of max_t) / T
        if constexpr (kSoft == Soft::kForwardKL) kl_sum = recentred_kl_sum<M>(kl_sum, st, ft, rise);
        if constexpr (kSoft == Soft::kReverseKL) kl_sum = recentred_kl_sum<M>(kl_sum, ss, fs, -rise);
        ss = ss * fs;
        st = st * ft;
        ms = cs;
        mt = ct;
        if (keep) {
          ms.store(keep->m_s + j0 / kChunk * W);
          mt.store(keep->m_t + j0 / kChunk * W);
        }
      }
      if (own) {
        s1 = s1 * M::exp(m1 - c1);
        m1 = c1;
        if (keep) m1.store(keep->m_1 + j0 / kChunk * W);
      }
      for (int64_t j = j0; j < j1; j += W) {
        const int64_t n = std::min(W, j1 - j);
        const Vec xs = IO::load(s + j, n, kNegInf);
        if constexpr (kHasSoft) {
          const Vec xt = IO::load(t + j, n, kNegInf);
          const Vec us = xs - ms, ut = xt - mt;  // -inf at -inf: the maxima start finite
          const Vec es = M::exp(us * v_inv_t), et = M::exp(ut * v_inv_t);
          ss = ss + es;
          st = st + et;
          if (keep) {  // padding lanes keep exp(-inf) = 0: the rows are W-padded
            es.store(keep->e_s + j);
            et.store(keep->e_t + j);
          }
          if constexpr (kSoft == Soft::kForwardKL) kl_sum = kl_sum + weighted<M>(et, (ut - us) * v_inv_t);
          if constexpr (kSoft == Soft::kReverseKL) kl_sum = kl_sum + weighted<M>(es, (us - ut) * v_inv_t);
        }
        if (own) {
          const Vec e1 = M::exp(xs - m1);
          s1 = s1 + e1;
          if (keep) e1.store(keep->e_1 + j);
        }
        if (smoothing) sum_x = sum_x + (n == W ? xs : IO::load(s + j, n, acc_t(0)));
      }
    }

    KDRowStats<acc_t> r{kNegInf, kNegInf, 0, 0, 0, 0, 0};
    if constexpr (kHasSoft) {
      const Vec fs = IO::merge(ms, ss, inv_t, r.max_s, r.sum_s), ft = IO::merge(mt, st, inv_t, r.max_t, r.sum_t);
      // Each lane's KL sum against the row's maxima (the lanes' sums ss, st are still their own).
      const Vec rise = ((Vec(r.max_s) - ms) - (Vec(r.max_t) - mt)) * v_inv_t;
      if constexpr (kSoft == Soft::kForwardKL) r.kl = IO::sum(recentred_kl_sum<M>(kl_sum, st, ft, rise));
      if constexpr (kSoft == Soft::kReverseKL) r.kl = IO::sum(recentred_kl_sum<M>(kl_sum, ss, fs, -rise));
      r.sum_ce = r.sum_s;
    }
    if constexpr (kCE) {
      if (own) {
        acc_t m_1, s_1;
        IO::merge(m1, s1, acc_t(1), m_1, s_1);
        if constexpr (!kHasSoft) r.max_s = s_1 > 0 ? m_1 : kNegInf;
        // Against max_s, the same max of the same logits (so the factor is 1).
        r.sum_ce = s_1 > 0 ? s_1 * std::exp(m_1 - r.max_s) : acc_t(0);
      }
      r.lin_ce = ce_linear_part(label >= 0, label >= 0 ? acc_t(s[label]) : acc_t(0),
                                smoothing ? IO::sum(sum_x) : acc_t(0), label_smoothing, n_classes);
    }
    if (r.sum_s == 0 && kHasSoft) r.max_s = kNegInf;  // no finite z_s: the lowest value above
    if (r.sum_t == 0) r.max_t = kNegInf;
    return r;
  }

  // Step 2 (JSD): K_t = sum p_t log(p_t / m) and K_s = sum p_s log(p_s / m) over the columns.
  // log p = (x - max) / T - lse, from the row's maxima and log-sums (log_sum).
  static void jsd_sums(const scalar_t* s, const scalar_t* t, int64_t C, const KDParams& p, acc_t max_s, acc_t lse_s,
                       acc_t max_t, acc_t lse_t, acc_t& k_t, acc_t& k_s) {
    const acc_t beta = p.beta;
    const Vec v_inv_t(acc_t(p.inv_temperature)), v_lse_s(lse_s), v_lse_t(lse_t), v_max_s(max_s), v_max_t(max_t);
    const Vec v_log_beta(std::log(beta)), v_log_1m_beta(std::log1p(-beta));
    Vec kt(0), ks(0);
    for (int64_t j = 0; j < C; j += W) {
      const int64_t n = std::min(W, C - j);
      const Vec lps = at::vec::fmadd(IO::load(s + j, n, kNegInf) - v_max_s, v_inv_t, -v_lse_s);
      const Vec lpt = at::vec::fmadd(IO::load(t + j, n, kNegInf) - v_max_t, v_inv_t, -v_lse_t);
      const Vec lm = log_mixture_of<M>(lps, lpt, v_log_beta, v_log_1m_beta);
      kt = kt + weighted<M>(M::exp(lpt), lpt - lm);
      ks = ks + weighted<M>(M::exp(lps), lps - lm);
    }
    k_t = IO::sum(kt);
    k_s = IO::sum(ks);
  }

  // Step 4: the gradient of the columns into g, times grad_scale gs.
  static void grad(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t C, int64_t label,
                   const KDRowConsts<acc_t>& c, const KDParams& p, acc_t gs, int64_t n_classes,
                   const RowScratch<acc_t>* kept, bool stream) {
    const bool own = ce_own(p);
    const acc_t beta = p.beta, label_smoothing = p.label_smoothing;
    const acc_t soft_gw = acc_t(p.soft_grad_weight) * gs, ce_gw = acc_t(p.alpha) * gs;
    // Reverse KL: d - D = lps - lpt - k; JSD: d - K_s = lps - log m - k.
    const acc_t inv_t = p.inv_temperature;
    const Vec v_inv_t(inv_t), v_lse_s(c.lse_s), v_lse_t(c.lse_t), v_lse_1(c.lse_ce);
    const Vec v_max_s(c.max_s), v_max_t(c.max_t);
    const Vec v_k(c.k), v_log_beta(std::log(beta)), v_log_1m_beta(std::log1p(-beta));
    const Vec v_soft_gw(kSoft == Soft::kJSD ? (1 - beta) * soft_gw : soft_gw), v_ce_gw(ce_gw);
    const Vec v_smooth(label_smoothing / acc_t(n_classes));
    Vec fs(0), ft(0), f1(0);  // the chunk's exp(m - lse) that turn kept exps into probabilities
    for (int64_t j = 0; j < C; j += W) {
      const int64_t n = std::min(W, C - j);
      if (!kept) {  // kd_slice_loss: this pass is the call's first over the row
        prefetch_ahead(s + j);
        prefetch_ahead(t + j);
      } else if (j % kChunk == 0) {
        const int64_t k = j / kChunk * W;
        if constexpr (kHasSoft) fs = M::exp(at::vec::fmadd(Vec::loadu(kept->m_s + k) - v_max_s, v_inv_t, -v_lse_s));
        if constexpr (kSoft == Soft::kForwardKL) {
          ft = M::exp(at::vec::fmadd(Vec::loadu(kept->m_t + k) - v_max_t, v_inv_t, -v_lse_t));
        }
        if (own) f1 = M::exp(Vec::loadu(kept->m_1 + k) - v_lse_1);
      }
      const Vec xs = IO::load(s + j, n, kNegInf);
      Vec gv(0), ps(0);
      if constexpr (kHasSoft) {
        const Vec xt = IO::load(t + j, n, kNegInf);
        const Vec lps = at::vec::fmadd(xs - v_max_s, v_inv_t, -v_lse_s);
        ps = kept ? Vec::loadu(kept->e_s + j) * fs : M::exp(lps);
        Vec d;
        if constexpr (kSoft == Soft::kForwardKL) {
          d = ps - (kept ? Vec::loadu(kept->e_t + j) * ft : M::exp(at::vec::fmadd(xt - v_max_t, v_inv_t, -v_lse_t)));
        } else if constexpr (kSoft == Soft::kReverseKL) {
          d = weighted<M>(ps, lps - at::vec::fmadd(xt - v_max_t, v_inv_t, -v_lse_t) - v_k);
        } else {
          const Vec lpt = at::vec::fmadd(xt - v_max_t, v_inv_t, -v_lse_t);
          d = weighted<M>(ps, lps - log_mixture_of<M>(lps, lpt, v_log_beta, v_log_1m_beta) - v_k);
        }
        gv = d * v_soft_gw;
      }
      if constexpr (kCE) {
        const Vec q = !own ? ps : kept ? Vec::loadu(kept->e_1 + j) * f1 : M::exp(xs - v_lse_1);
        gv = at::vec::fmadd(q - v_smooth, v_ce_gw, gv);
        if (label >= j && label < j + n) gv = IO::add_at(gv, label - j, -ce_gw * (1 - label_smoothing));
      }
      IO::store(g + j, gv, n, stream);
    }
  }
};

template <typename scalar_t, Soft kSoft, bool kCE>
void rows_impl(const KDRows& a, int64_t begin, int64_t end) {
  using R = Row<scalar_t, kSoft, kCE>;
  using acc_t = typename R::acc_t;
  const KDParams& p = a.p;
  const int64_t C = a.slice_classes;
  const acc_t gs = a.grad_scale;
  auto* loss = static_cast<acc_t*>(a.loss);
  const auto* stats_in = static_cast<const acc_t*>(a.stats);
  const auto* jsd_in = static_cast<const acc_t*>(a.jsd);
  auto* out = static_cast<acc_t*>(a.out);

  // fused_kd_loss keeps the statistics pass's exps for the gradient pass (RowScratch).
  std::unique_ptr<acc_t[]> scratch;
  RowScratch<acc_t> kept{};
  const bool keep = a.mode == KDMode::kFused && p.compute_grad;
  if (keep) {
    const int64_t padded = (C + R::W - 1) / R::W * R::W, chunk_lanes = (C + R::kChunk - 1) / R::kChunk * R::W;
    // Every element is written before it is read; rows of unused distributions stay untouched.
    scratch.reset(new acc_t[3 * (padded + chunk_lanes)]);
    acc_t* e = scratch.get();
    acc_t* m = e + 3 * padded;
    kept = {e, e + padded, e + 2 * padded, m, m + chunk_lanes, m + 2 * chunk_lanes};
  }

  for (int64_t row = begin; row < end; ++row) {
    const auto* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
    const auto* t = static_cast<const scalar_t*>(a.teacher) + row * a.t_stride;
    const int64_t label = a.labels ? a.labels[row] : -1;
    const bool ignored = a.labels && label == p.ignore_index;
    const int64_t column = label - a.class_offset;
    const int64_t label_here = a.labels && !ignored && column >= 0 && column < C ? column : -1;
    if (a.mode == KDMode::kStats) {
      (ignored ? KDRowStats<acc_t>{0, 0, 0, 0, 0, 0, 0} : R::stats(s, t, C, label_here, p, a.n_classes))
          .store(out + row * kNumKDStats);
      continue;
    }
    if (a.mode == KDMode::kJSDSums) {
      acc_t* sums = out + row * 2;
      sums[0] = sums[1] = 0;
      if (!ignored) {
        const auto st = KDRowStats<acc_t>::load(stats_in + row * kNumKDStats);
        R::jsd_sums(s, t, C, p, st.max_s, log_sum(st.max_s, st.sum_s), st.max_t, log_sum(st.max_t, st.sum_t), sums[0],
                    sums[1]);
      }
      continue;
    }

    // kFused, kSlice: the row's loss and its columns' gradient.
    scalar_t* g = p.compute_grad ? static_cast<scalar_t*>(a.grad) + row * C : nullptr;
    if (ignored) {
      loss[row] = 0;
      if (g) {
        for (int64_t j = 0; j < C; ++j) g[j] = scalar_t(0);
      }
      continue;
    }
    KDRowStats<acc_t> st;
    acc_t k_t = 0, k_s = 0;
    if (a.mode == KDMode::kFused) {
      st = R::stats(s, t, C, label_here, p, C, keep ? &kept : nullptr);
      if constexpr (kSoft == Soft::kJSD) {
        R::jsd_sums(s, t, C, p, st.max_s, log_sum(st.max_s, st.sum_s), st.max_t, log_sum(st.max_t, st.sum_t), k_t,
                    k_s);
      }
    } else {
      st = KDRowStats<acc_t>::load(stats_in + row * kNumKDStats);
      if constexpr (kSoft == Soft::kJSD) {
        k_t = jsd_in[row * 2];
        k_s = jsd_in[row * 2 + 1];
      }
    }
    const KDRowConsts<acc_t> c = kd_row_consts(st, p, k_t, k_s);
    loss[row] = c.loss;
    if (g) R::grad(s, t, g, C, label_here, c, p, gs, a.n_classes, keep ? &kept : nullptr, a.stream_grad);
  }
  if (a.stream_grad) streaming_fence();
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
