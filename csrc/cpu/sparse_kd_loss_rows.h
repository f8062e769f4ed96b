// The row kernel of sparse_kd_loss, vectorised with at::vec. Each isa_<isa>.cpp includes it
// once (through isa_kernels.h), after choosing the instruction set and CPU_CAPABILITY; the
// code below is in an anonymous namespace, so the copies never meet at link time.
//
// A row (the maths: csrc/sparse_kd_loss.h), z = x / T:
//   its K entries, scalar: which count (the first read occurrence of an index the mask
//     keeps), the teacher's statistics and the student's at the listed columns;
//   the pass over the row, only when a term needs the columns not listed ("tail") or all of
//     them (the CE): lane-wise online softmax statistics of the raw logits (row_io.h's policy
//     as in kd_loss_rows.h, a chunk's max first, then one exp per element and scale). Under
//     "tail" the listed columns, sorted, split the row into K + 1 plain ranges, and the pass
//     runs over those: the unlisted statistics are accumulated over the unlisted columns
//     themselves, never the row's minus the entries' (which cancels at small T);
//   the gradient: the unlisted columns' formula over the whole row, vectorised (or, under
//     "renormalize" without the CE, zeros: a memset), then each entry's own formula.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "row_io.h"
#include "sparse_kd_loss_cpu.h"

namespace lepton_fast {
namespace cpu {
namespace {

template <typename scalar_t>
struct SparseRow {
  using IO = RowIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using M = VecMath<acc_t>;
  using Stats = WeightedSoftmaxStats<acc_t>;
  static constexpr int64_t W = IO::W;
  static constexpr int64_t kChunk = 16 * W;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Lane-wise statistics of the columns read so far: the running max of the raw logits (from
  // the lowest finite value, never -inf, so that no difference is -inf - -inf), the sums of
  // exp((x - max) / T) and of exp(x - max), and the sum of x (label smoothing).
  struct Lanes {
    Vec max = Vec(std::numeric_limits<acc_t>::lowest()), sum_t = Vec(0), sum_1 = Vec(0), sum_x = Vec(0);
  };

  // Adds the columns [j0, j1) of s to `lanes`: at T when at_t, at 1 (and their sum) when at_1.
  static void add_range(const scalar_t* s, int64_t j0, int64_t j1, acc_t inv_t, bool at_t, bool at_1,
                        bool smoothing, Lanes& lanes) {
    const Vec v_inv_t(inv_t);
    Vec m = lanes.max, st = lanes.sum_t, s1 = lanes.sum_1, sx = lanes.sum_x;  // in registers
    for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
      const int64_t c1 = std::min(j1, c0 + kChunk);
      Vec r = m;
      for (int64_t j = c0; j < c1; j += W) {
        prefetch_ahead(s + j);
        r = M::running_max(r, IO::load(s + j, std::min(W, c1 - j), kNegInf));
      }
      if (at_t) st = st * M::exp((m - r) * v_inv_t);
      if (at_1) s1 = s1 * M::exp(m - r);
      m = r;
      for (int64_t j = c0; j < c1; j += W) {
        const int64_t n = std::min(W, c1 - j);
        const Vec x = IO::load(s + j, n, kNegInf);
        if (at_t) st = st + M::exp((x - m) * v_inv_t);
        if (at_1) s1 = s1 + M::exp(x - m);
        if (smoothing) sx = sx + (n == W ? x : IO::load(s + j, n, acc_t(0)));
      }
    }
    lanes = Lanes{m, st, s1, sx};
  }

  // The lanes' statistics at `scale` as one row's (csrc/kd_loss.h), max -inf where no column
  // had a finite logit.
  static Stats row_stats(Vec max, Vec sum, acc_t scale) {
    Stats r;
    r.scale = scale;
    acc_t unused;
    IO::merge(max, sum, Vec(0), scale, r.max, r.sum, unused);
    if (r.sum == 0) r.max = kNegInf;
    return r;
  }

  // The unlisted columns' gradient (sparse_unlisted_grad, times sg) plus the CE's (times cg)
  // at every column of the row; the entries' columns are overwritten afterwards.
  static void grad(const scalar_t* s, scalar_t* g, int64_t V, int64_t label, const SparseRowConsts<acc_t>& c,
                   bool soft, bool ce, acc_t sg, acc_t g_tail, acc_t big_g, acc_t cg, acc_t lse1,
                   acc_t label_smoothing, bool stream) {
    const bool has_pu = c.max_u != kNegInf;
    const Vec v_inv_t(c.inv_t), v_max_u(c.max_u), v_lsum_u(c.log_sum_u);
    const Vec v_sg(sg), v_g_tail(g_tail), v_big_g(big_g), v_cg(cg), v_lse1(lse1), v_q_tail(std::exp(c.logq_tail));
    const Vec v_smooth(label_smoothing / acc_t(V));
    for (int64_t j = 0; j < V; j += W) {
      const int64_t n = std::min(W, V - j);
      const Vec x = IO::load(s + j, n, kNegInf);
      Vec dv(0);
      // p = pu Q_tail: one exp (Q_tail <= 1 multiplies, never divides). Without a finite
      // unlisted logit both are 0 at every unlisted column (the listed ones come next).
      if (soft && has_pu) {
        const Vec pu = M::exp(at::vec::fmadd(x - v_max_u, v_inv_t, -v_lsum_u));
        dv = (weighted<M>(pu, v_g_tail) - weighted<M>(pu * v_q_tail, v_big_g)) * v_sg;
      }
      if (ce) {
        dv = at::vec::fmadd(M::exp(x - v_lse1) - v_smooth, v_cg, dv);
        if (label >= j && label < j + n) {
          alignas(64) acc_t buf[W];
          dv.store(buf);
          buf[label - j] -= cg * (1 - label_smoothing);
          dv = Vec::loadu(buf);
        }
      }
      IO::store(g + j, dv, n, stream);
    }
  }

  // A row of zeros (+0.0 is all-zero bits in the four dtypes).
  static void zero(scalar_t* g, int64_t V, bool stream) {
    if (stream) {
      for (int64_t j = 0; j < V; j += W) IO::store(g + j, Vec(0), std::min(W, V - j), true);
    } else {
      std::memset(g, 0, V * sizeof(scalar_t));
    }
  }

  static void rows(const SparseRows& a, int64_t begin, int64_t end) {
    const KDParams& p = a.p;
    const int64_t V = a.n_classes, K = a.k;
    const acc_t inv_t = p.inv_temperature, beta = p.beta, label_smoothing = p.label_smoothing;
    const acc_t log_beta = std::log(beta), log_1m_beta = std::log1p(-beta);
    const bool row_tail = a.tail && p.needs_soft;
    const bool smoothing = p.needs_ce && label_smoothing > 0;
    std::vector<char> counted(K);
    std::vector<acc_t> xk(K), lp(K), g(K);
    std::vector<int64_t> listed;
    listed.reserve(K);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
      scalar_t* gr = a.grad ? static_cast<scalar_t*>(a.grad) + row * V : nullptr;
      acc_t& out = static_cast<acc_t*>(a.rows)[row];
      const int64_t label = a.labels ? a.labels[row] : -1;
      if (a.labels && label == p.ignore_index) {
        out = 0;
        if (gr) zero(gr, V, a.stream_grad);
        continue;
      }
      const int64_t* idx = a.indices + row * K;
      const acc_t* lpr = static_cast<const acc_t*>(a.logprobs) + row * K;
      const bool* mk = a.mask ? a.mask + row * K : nullptr;
      Stats teacher_t, teacher_1, student;
      teacher_t.scale = student.scale = inv_t;
      listed.clear();
      for (int64_t k = 0; k < K; ++k) {  // an index counts at its first read occurrence
        bool c = !mk || mk[k];
        if (c) {
          TORCH_CHECK_VALUE(idx[k] >= 0 && idx[k] < V, "sparse_kd_loss: teacher_indices must be in [0, ", V,
                            ") where teacher_mask is True; got ", idx[k], " at row ", row, ", entry ", k);
          for (int64_t j = 0; j < k && c; ++j) c = !(counted[j] && idx[j] == idx[k]);
        }
        counted[k] = c;
        if (!c) continue;
        listed.push_back(idx[k]);
        xk[k] = s[idx[k]];
        lp[k] = lpr[k];
        teacher_t.add(lp[k]);
        teacher_1.add(lp[k]);
        student.add(xk[k]);
      }
      // The pass over the row: the softmax statistics at T of the columns not listed (the
      // ranges between the sorted listed ones) and at 1 of all of them (the CE: the same
      // ranges, then the listed columns one by one).
      Stats unlisted, ce;
      unlisted.scale = inv_t;
      acc_t sum_x = 0;
      if (row_tail || p.needs_ce) {
        Lanes lanes;
        if (row_tail) {
          std::sort(listed.begin(), listed.end());
          int64_t j0 = 0;
          for (const int64_t j : listed) {
            add_range(s, j0, j, inv_t, true, p.needs_ce, smoothing, lanes);
            j0 = j + 1;
          }
          add_range(s, j0, V, inv_t, true, p.needs_ce, smoothing, lanes);
          unlisted = row_stats(lanes.max, lanes.sum_t, inv_t);
        } else {
          add_range(s, 0, V, inv_t, false, true, smoothing, lanes);
        }
        if (p.needs_ce) {
          ce = row_stats(lanes.max, lanes.sum_1, acc_t(1));
          if (smoothing) sum_x = IO::sum(lanes.sum_x);
          if (row_tail) {
            for (const int64_t j : listed) {
              ce.add(acc_t(s[j]));
              sum_x += acc_t(s[j]);
            }
          }
        }
      }
      acc_t row_loss = 0, big_g = 0, g_tail = 0;
      SparseRowConsts<acc_t> c{};
      if (p.needs_soft) {
        c = sparse_row_consts(a.tail, static_cast<int64_t>(listed.size()) == V, inv_t, teacher_t, teacher_1,
                              student, unlisted);
        acc_t d = 0;
        for (int64_t k = 0; k < K; ++k) {
          if (!counted[k]) continue;
          const SparseBucket<acc_t> b =
              sparse_bucket(p.divergence, c.logp(lp[k]), c.logq(xk[k]), beta, log_beta, log_1m_beta);
          d += b.d;
          big_g += g[k] = b.g;
        }
        if (a.tail) {
          const SparseBucket<acc_t> b =
              sparse_bucket(p.divergence, c.logp_tail, c.logq_tail, beta, log_beta, log_1m_beta);
          d += b.d;
          big_g += g_tail = b.g;
        }
        row_loss += acc_t(p.soft_weight) * d;
      }
      const acc_t lse1 = lse_from_sum(ce.max, ce.sum);
      if (p.needs_ce) {
        row_loss += acc_t(p.alpha) * (lse1 - ce_linear_part(true, acc_t(s[label]), sum_x, label_smoothing, V));
      }
      out = row_loss;
      if (!gr) continue;
      const acc_t sg = acc_t(p.soft_grad_weight * a.grad_scale), cg = acc_t(p.alpha * a.grad_scale);
      if (row_tail || p.needs_ce) {
        grad(s, gr, V, label, c, row_tail, p.needs_ce, sg, g_tail, big_g, cg, lse1, label_smoothing, a.stream_grad);
      } else {  // "renormalize" without the CE: no column but the entries' has a gradient
        zero(gr, V, a.stream_grad);
      }
      if (p.needs_soft) {
        for (int64_t k = 0; k < K; ++k) {
          if (!counted[k]) continue;
          acc_t dk = (g[k] - std::exp(c.logq(xk[k])) * big_g) * sg;
          if (p.needs_ce) {
            const int64_t j = idx[k];
            dk += cg * (std::exp(acc_t(s[j]) - lse1) - label_smoothing / V - (j == label ? 1 - label_smoothing : 0));
          }
          gr[idx[k]] = static_cast<scalar_t>(dk);
        }
      }
    }
    if (a.stream_grad) streaming_fence();
  }
};

inline void sparse_kd_rows_any_dtype(const SparseRows& a, int64_t begin, int64_t end) {
  with_row_dtype(a.dtype, [&](auto tag) { SparseRow<decltype(tag)>::rows(a, begin, end); });
}

}  // namespace
}  // namespace cpu
}  // namespace lepton_fast
