// The row kernel of sparse_kd_loss, vectorised with at::vec. Each isa_<isa>.cpp includes it
// once (through isa_kernels.h), after choosing the instruction set and CPU_CAPABILITY; the
// code below is in an anonymous namespace, so the copies never meet at link time.
//
// A row (the maths: csrc/sparse_kd_loss.h), z = x / T:
//   its K entries: which count (the first read occurrence of an index the mask keeps), then,
//     gathered into contiguous buffers (Entries), the teacher's statistics, the student's at
//     the listed columns, the buckets and the entries' gradients, a vector of entries at a time;
//   the pass over the row, only when a term needs the columns not listed ("tail") or all of
//     them (the CE): lane-wise online softmax statistics of the raw logits (row_io.h's policy
//     as in kd_loss_rows.h, a chunk's max first, then one exp per element and sum). Under
//     "tail" the listed columns, sorted, are read as -inf, so the unlisted statistics are
//     accumulated over the unlisted columns themselves, never the row's minus the entries'
//     (which cancels at small T: at T <= 1e-2 a peaked student's tail is below float32's
//     epsilon of the row's sum). With a gradient to write, the pass keeps its exps (Kept);
//   the gradient: the unlisted columns' formula over the whole row from the kept exps, no exp
//     per column and no second read of the logits (or, under "renormalize" without the CE,
//     zeros: a memset), then each entry's own formula.
// The vocabulary-parallel ops (slice_stats, slice_grad below) split a row at that point: the
// same pass gives a slice's statistics, and the gradient is a second pass that recomputes its
// exps from the merged statistics (the slice is not kept between the two all-reduces).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>
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
  using Stats = SoftmaxStats<acc_t>;
  static constexpr int64_t W = IO::W;
  static constexpr int64_t kChunk = 16 * W;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Lane-wise statistics of the columns read so far: the running max of the raw logits (from
  // the lowest finite value, never -inf, so that no difference is -inf - -inf), the sums of
  // exp((x - max) / T) and of exp(x - max), and the sum of x (label smoothing).
  struct Lanes {
    Vec max = Vec(std::numeric_limits<acc_t>::lowest()), sum_t = Vec(0), sum_1 = Vec(0), sum_x = Vec(0);
  };

  // The pass's exps, kept for the gradient as kd_loss_rows.h's RowScratch keeps them: per
  // column e_t = exp((x - m) / T) and e_1 = exp(x - m), m (W per chunk) the lane's running max
  // at the column's chunk; 0 at a listed column of "tail" and in the padding lanes. Allocated
  // once per task (the rows of a thread), only for the sums the pass takes.
  struct Kept {
    std::vector<acc_t> e_t, e_1, m;
  };

  // The n <= W columns of s at j, those listed (sorted; the next one not yet passed at *next)
  // as -inf: the unlisted statistics are accumulated over the unlisted columns themselves,
  // never as the row's minus the entries' (which cancels at small T).
  // A listed column's lane is blended in registers (lane indices compared, small integers,
  // exact in acc_t): written into a buffer and reloaded, each cost a store-forwarding stall,
  // twice per pass.
  static Vec load_unlisted(const scalar_t* s, int64_t j, int64_t n, const int64_t*& next, const int64_t* end) {
    Vec x = IO::load(s + j, n, kNegInf);
    for (; next != end && *next < j + W; ++next) {
      x = Vec::blendv(x, Vec(kNegInf), Vec::arange(acc_t(0), acc_t(1)) == Vec(acc_t(*next - j)));
    }
    return x;
  }

  // The pass over the row s, its listed columns [listed, end) left out: the lanes' statistics
  // at T when at_t, at 1 when at_1, the sum of every x when smoothing; the exps into `keep`.
  static Lanes pass(const scalar_t* s, int64_t V, const int64_t* listed, const int64_t* end, acc_t inv_t, bool at_t,
                    bool at_1, bool smoothing, Kept* keep) {
    const Vec v_inv_t(inv_t);
    Lanes l;
    Vec m = l.max, st = l.sum_t, s1 = l.sum_1, sx = l.sum_x;  // in registers
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t c1 = std::min(V, c0 + kChunk);
      const int64_t* next = listed;
      Vec r = m;
      for (int64_t j = c0; j < c1; j += W) {
        prefetch_ahead(s + j);
        r = M::running_max(r, load_unlisted(s, j, std::min(W, c1 - j), next, end));
      }
      if (at_t) st = st * M::exp((m - r) * v_inv_t);
      if (at_1) s1 = s1 * M::exp(m - r);
      m = r;
      if (keep) m.store(keep->m.data() + c0 / kChunk * W);
      next = listed;
      for (int64_t j = c0; j < c1; j += W) {
        const int64_t n = std::min(W, c1 - j);
        const Vec x = load_unlisted(s, j, n, next, end);
        if (at_t) {
          const Vec e = M::exp((x - m) * v_inv_t);
          st = st + e;
          if (keep) e.store(keep->e_t.data() + j);
        }
        if (at_1) {
          const Vec e = M::exp(x - m);
          s1 = s1 + e;
          if (keep) e.store(keep->e_1.data() + j);
        }
        if (smoothing) sx = sx + IO::load(s + j, n, acc_t(0));
      }
      listed = next;
    }
    return Lanes{m, st, s1, sx};
  }

  // The lanes' statistics at `scale` as one row's (csrc/kd_loss.h), max -inf where no column
  // had a finite logit.
  static Stats row_stats(Vec max, Vec sum, acc_t scale) {
    Stats r;
    r.scale = scale;
    IO::merge(max, sum, scale, r.max, r.sum);
    if (r.sum == 0) r.max = kNegInf;
    return r;
  }

  // A row's counted entries, gathered once into contiguous buffers so that their exps and
  // logs run W at a time: their columns (ascending where they are the pass's listed columns),
  // the teacher's log-probabilities and the student's logits, padded to a whole number of
  // vectors with -inf (a bucket of probability 0 on both sides: no term in a softmax sum,
  // d = g = 0), and a buffer for the buckets' g, then the entries' gradients.
  struct Entries {
    std::vector<int64_t> col;
    std::vector<acc_t> lp, x, g;
    int64_t n = 0, padded = 0;

    explicit Entries(int64_t K) : col(K), lp(pad(K)), x(pad(K)), g(pad(K)) {}
    static int64_t pad(int64_t n) { return (n + W - 1) / W * W; }
    // The student's logits at the entries' columns of s, with the padding.
    void gather(const scalar_t* s) {
      for (int64_t i = 0; i < n; ++i) x[i] = acc_t(s[col[i]]);
      std::fill(x.begin() + n, x.begin() + padded, kNegInf);
    }
  };

  // The softmax statistics at `scale` (csrc/kd_loss.h) of the `padded` values at v, as
  // SoftmaxStats::add gives them one by one (max -inf where none is finite), but with
  // a NaN-propagating max: the vector exp maps NaN to a finite value (common.h).
  static Stats buffer_stats(const acc_t* v, int64_t padded, acc_t scale) {
    Vec mv(std::numeric_limits<acc_t>::lowest());
    for (int64_t i = 0; i < padded; i += W) mv = M::max(mv, Vec::loadu(v + i));
    Stats r;
    r.scale = scale;
    r.max = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return M::max(a, b); }, mv);
    const Vec m(r.max), v_scale(scale);
    Vec sum(0);
    for (int64_t i = 0; i < padded; i += W) sum = sum + M::exp((Vec::loadu(v + i) - m) * v_scale);
    r.sum = IO::sum(sum);
    if (r.sum == 0 && r.max == r.max) r.max = kNegInf;
    return r;
  }

  // The unlisted columns' gradient (sparse_unlisted_grad, times sg) plus the CE's (times cg;
  // its softmax from the kept e_t when ce_at_t, else e_1) at every column of the row, from the
  // kept exps: a kept exp times its chunk's factor is the probability, so no exp per column.
  // The entries' columns are overwritten afterwards.
  static void grad(scalar_t* g, int64_t V, int64_t label, const SparseRowConsts<acc_t>& c, const Kept& kept,
                   bool soft, bool ce, bool ce_at_t, acc_t sg, acc_t g_tail, acc_t big_g, acc_t cg, acc_t lse1,
                   acc_t label_smoothing, bool stream) {
    // Without a finite unlisted logit pu and p are 0 at every unlisted column.
    const bool has_pu = soft && c.max_u != kNegInf;
    const Vec v_inv_t(c.inv_t), v_max_u(c.max_u), v_lsum_u(c.log_sum_u);
    const Vec v_sg(sg), v_g_tail(g_tail), v_big_g(big_g), v_cg(cg), v_lse1(lse1), v_q_tail(std::exp(c.logq_tail));
    const Vec v_smooth_cg(label_smoothing / acc_t(V) * cg);
    const acc_t* e_t = kept.e_t.data();
    const acc_t* e_1 = ce_at_t ? e_t : kept.e_1.data();
    // Per chunk, what multiplies a kept exp: for the soft term fu = exp((m - max_u) / T -
    // log_sum_u) (pu = e fu; p = pu Q_tail: Q_tail <= 1 multiplies, never divides) folded with
    // the buckets' weights, for the CE exp(m - lse1) cg; a column costs a multiply or two.
    Vec soft_f(0), ce_f(0);
    for (int64_t j = 0; j < V; j += W) {
      const int64_t n = std::min(W, V - j);
      if (j % kChunk == 0) {
        const Vec m = Vec::loadu(kept.m.data() + j / kChunk * W);
        if (has_pu) {
          const Vec fu = M::exp(at::vec::fmadd(m - v_max_u, v_inv_t, -v_lsum_u));
          soft_f = (weighted<M>(fu, v_g_tail) - weighted<M>(fu * v_q_tail, v_big_g)) * v_sg;
        }
        if (ce) ce_f = M::exp(m - v_lse1) * v_cg;
      }
      Vec dv(0);
      if (has_pu) dv = weighted<M>(Vec::loadu(e_t + j), soft_f);  // 0 where pu is, also against an infinite g
      if (ce) {
        dv = at::vec::fmadd(Vec::loadu(e_1 + j), ce_f, dv - v_smooth_cg);
        if (label >= j && label < j + n) dv = IO::add_at(dv, label - j, -cg * (1 - label_smoothing));
      }
      IO::store(g + j, dv, n, stream);
    }
  }

  // The student's columns that a row's entries list: K reads at random columns, a cache miss
  // and often a TLB miss each, which, read one by one among the entries' exps, were most of
  // the "renormalize" kernel's time. Without a pass over the row (which brings them in
  // before they are read), the next row's are fetched while this row's work hides them.
  static void prefetch_entries(const SparseRows& a, int64_t row) {
    const scalar_t* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
    const int64_t* idx = a.indices + row * a.k;
    for (int64_t k = 0; k < a.k; ++k) {
      if (idx[k] >= 0 && idx[k] < a.n_classes) __builtin_prefetch(s + idx[k]);
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

  // --- The vocabulary-parallel split: sparse_slice_stats and sparse_slice_grad, one pass each ---

  // The slice row's listed columns (its counted entries' columns >= 0), sorted, into e.col,
  // after checking them: in [-1, C), none twice (the reference kernel makes the same checks).
  static void slice_listed(const int64_t* col, int64_t K, int64_t C, int64_t row, Entries& e) {
    e.n = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (col[k] == -1) continue;
      TORCH_CHECK_VALUE(col[k] >= 0 && col[k] < C, "sparse_slice: column must be in [-1, ", C, "); got ", col[k],
                        " at row ", row, ", entry ", k);
      e.col[e.n++] = col[k];
    }
    e.padded = Entries::pad(e.n);
    std::sort(e.col.begin(), e.col.begin() + e.n);
    TORCH_CHECK_VALUE(std::adjacent_find(e.col.begin(), e.col.begin() + e.n) == e.col.begin() + e.n,
                      "sparse_slice: a row of column lists a column twice (row ", row, ")");
  }

  // The label's column in the slice, or -1 (no labels, or a label in another slice).
  static int64_t label_column(const SparseSliceRows& a, int64_t row) {
    if (!a.labels) return -1;
    const int64_t j = a.labels[row] - a.class_offset;
    return j >= 0 && j < a.slice_classes ? j : -1;
  }

  static bool ignored(const SparseSliceRows& a, int64_t row) {
    return a.labels && a.labels[row] == a.p.ignore_index;
  }

  // The slice's statistics against its own maxima: the pass of sparse_kd_loss (the listed
  // columns read as -inf under "tail", so the unlisted statistics come from the unlisted
  // columns themselves), then the listed columns added one by one for the row's; the caller
  // rescales each sum to the maxima merged over the slices, with no second read.
  static void slice_stats(const SparseSliceRows& a, int64_t begin, int64_t end) {
    const KDParams& p = a.p;
    const int64_t C = a.slice_classes, K = a.k, width = kSpEntries + K;
    const acc_t inv_t = p.inv_temperature, label_smoothing = p.label_smoothing;
    const bool tail = a.tail && p.needs_soft, ce = p.needs_ce, smoothing = ce && label_smoothing > 0;
    const bool at_t = tail, at_1 = ce && !(at_t && inv_t == acc_t(1));  // as in rows()
    Entries e(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* col = a.column + row * K;
      acc_t* out = static_cast<acc_t*>(a.out) + row * width;
      slice_listed(col, K, C, row, e);
      std::fill(out, out + width, acc_t(0));
      out[kSpMax] = out[kSpMaxUnlisted] = kNegInf;
      if (ignored(a, row)) continue;
      const scalar_t* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
      if (tail || ce) {
        const int64_t* lb = e.col.data();
        const Lanes lanes = pass(s, C, lb, tail ? lb + e.n : lb, inv_t, at_t, at_1, smoothing, nullptr);
        if (tail) {
          e.gather(s);  // the listed columns, for the row's statistics (and the CE's below)
          Stats all = row_stats(lanes.max, lanes.sum_t, inv_t);
          out[kSpMaxUnlisted] = all.max;
          out[kSpSumUnlisted] = all.sum;
          all.merge(buffer_stats(e.x.data(), e.padded, inv_t));
          out[kSpMax] = all.max;
          out[kSpSum] = all.sum;
        }
        if (ce) {
          Stats all = row_stats(lanes.max, at_1 ? lanes.sum_1 : lanes.sum_t, acc_t(1));
          if (tail) all.merge(buffer_stats(e.x.data(), e.padded, acc_t(1)));
          out[kSpMax] = all.max;
          out[kSpSumCE] = all.sum;
          const int64_t lc = label_column(a, row);
          acc_t lin = lc >= 0 ? (1 - label_smoothing) * acc_t(s[lc]) : acc_t(0);
          if (smoothing) lin += label_smoothing / acc_t(a.n_classes) * IO::sum(lanes.sum_x);
          out[kSpLinCE] = lin;
        }
      }
      if (p.needs_soft) {
        for (int64_t k = 0; k < K; ++k) out[kSpEntries + k] = col[k] >= 0 ? acc_t(s[col[k]]) : acc_t(0);
      }
    }
  }

  // Above this (max - max_unlisted) / T the unlisted term keeps an exp of its own: below it,
  // exp((x - max_u) / T) = exp((x - max) / T) exp((max - max_u) / T) shares the softmax's exp,
  // and a factor <= e^16 leaves exp((x - max) / T) >= e^-16 times the unlisted one, far from
  // underflow wherever that term matters.
  static constexpr acc_t kFoldUnlisted = 16;

  // The slice's gradient from its rows' coefficients: the dense formula at every column
  // (1 to 3 exps an element, each only where its coefficient is not 0), written once; then
  // each listed column overwritten with its own (no unlisted term, its entry's coefficient).
  static void slice_grad(const SparseSliceRows& a, int64_t begin, int64_t end) {
    const int64_t C = a.slice_classes, K = a.k, width = kGrEntries + K;
    const acc_t inv_t = a.p.inv_temperature;
    const Vec v_inv_t(inv_t);
    Entries e(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* col = a.column + row * K;
      slice_listed(col, K, C, row, e);
      scalar_t* g = static_cast<scalar_t*>(a.out) + row * C;
      if (ignored(a, row)) {
        zero(g, C, a.stream_grad);
        continue;
      }
      const scalar_t* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
      const acc_t* cf = static_cast<const acc_t*>(a.coefficients) + row * width;
      const acc_t m = cf[kGrMax], mu = cf[kGrMaxUnlisted], c0 = cf[kGrConst], cu = cf[kGrUnlisted];
      acc_t ct = cf[kGrSoftmax], c1 = cf[kGrSoftmaxCE];
      if (inv_t == acc_t(1)) {  // the CE's softmax is the soft term's: one exp
        ct += c1;
        c1 = 0;
      }
      const bool fold = cu != 0 && (m - mu) * inv_t <= kFoldUnlisted;
      const acc_t ct_dense = fold ? ct + cu * std::exp((m - mu) * inv_t) : ct;
      const bool own_u = cu != 0 && !fold;
      const int64_t lc = label_column(a, row);
      const acc_t c_label = cf[kGrLabel];
      const Vec v_m(m), v_c0(c0), v_c1(c1);
      if (c0 == 0 && ct_dense == 0 && c1 == 0 && !own_u) {
        zero(g, C, a.stream_grad);
        if (lc >= 0) g[lc] = static_cast<scalar_t>(c_label);
      } else {
        const Vec v_mu(mu), v_ct(ct_dense), v_cu(cu);
        for (int64_t j = 0; j < C; j += W) {
          prefetch_ahead(s + j);
          const int64_t n = std::min(W, C - j);
          const Vec x = IO::load(s + j, n, m);  // padding lanes: exps of 0, never stored
          Vec dv = v_c0;
          if (ct_dense != 0) dv = at::vec::fmadd(M::exp((x - v_m) * v_inv_t), v_ct, dv);
          if (own_u) dv = at::vec::fmadd(M::exp((x - v_mu) * v_inv_t), v_cu, dv);
          if (c1 != 0) dv = at::vec::fmadd(M::exp(x - v_m), v_c1, dv);
          if (lc >= j && lc < j + n) dv = IO::add_at(dv, lc - j, c_label);
          IO::store(g + j, dv, n, a.stream_grad);
        }
      }
      // The listed columns' own, W at a time: their columns, logits and coefficients in entry
      // order (e.g, then their gradients).
      e.n = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (col[k] < 0) continue;
        e.col[e.n] = col[k];
        e.g[e.n++] = cf[kGrEntries + k];
      }
      e.gather(s);
      for (int64_t i = 0; i < e.padded; i += W) {
        const Vec x = Vec::loadu(e.x.data() + i);
        Vec dk = v_c0 + Vec::loadu(e.g.data() + i);
        if (ct != 0) dk = at::vec::fmadd(M::exp((x - v_m) * v_inv_t), Vec(ct), dk);
        if (c1 != 0) dk = at::vec::fmadd(M::exp(x - v_m), v_c1, dk);
        dk.store(e.g.data() + i);
      }
      for (int64_t i = 0; i < e.n; ++i) {
        const int64_t j = e.col[i];
        g[j] = static_cast<scalar_t>(j == lc ? e.g[i] + c_label : e.g[i]);
      }
    }
    if (a.stream_grad) streaming_fence();
  }

  // The entries' vector work is in functions of their own (noinline): inlined into rows(),
  // its constants took registers from the pass's exp, whose constants were then reloaded
  // per vector (tail, K = 1, 1024 x 32000: 22.0 -> 30.4 ms, one thread).

  // The entries' buckets (sparse_bucket, a vector of entries at a time): their g into e.g;
  // returns the sums of their d and their g.
  __attribute__((noinline)) static std::pair<acc_t, acc_t> entry_buckets(Entries& e,
                                                                          const SparseRowConsts<acc_t>& c,
                                                                          Divergence div, acc_t beta,
                                                                          acc_t log_beta, acc_t log_1m_beta) {
    const Vec v_beta(beta), v_log_beta(log_beta), v_log_1m_beta(log_1m_beta);
    Vec d(0), gs(0);
    for (int64_t i = 0; i < e.padded; i += W) {
      const SparseBucket<Vec> b = sparse_bucket<Vec, M>(div, c.logp(Vec::loadu(e.lp.data() + i)),
                                                        c.logq(Vec::loadu(e.x.data() + i)), v_beta, v_log_beta,
                                                        v_log_1m_beta);
      d = d + b.d;
      gs = gs + b.g;
      b.g.store(e.g.data() + i);
    }
    return {IO::sum(d), IO::sum(gs)};
  }

  // The entries' own gradient, written over what grad() left at their columns: the soft
  // term's (g_k - Q_k G) sg, plus the CE's (times cg) when it is on.
  __attribute__((noinline)) static void entries_grad(scalar_t* gr, Entries& e, const SparseRowConsts<acc_t>& c, acc_t big_g, acc_t sg,
                           bool ce, acc_t cg, acc_t lse1, int64_t label, acc_t label_smoothing, int64_t V) {
    const Vec v_big_g(big_g), v_sg(sg), v_cg(cg), v_lse1(lse1), v_smooth(label_smoothing / acc_t(V));
    for (int64_t i = 0; i < e.padded; i += W) {
      const Vec x = Vec::loadu(e.x.data() + i);
      Vec dk = (Vec::loadu(e.g.data() + i) - M::exp(c.logq(x)) * v_big_g) * v_sg;
      if (ce) dk = at::vec::fmadd(v_cg, M::exp(x - v_lse1) - v_smooth, dk);
      dk.store(e.g.data() + i);
    }
    const acc_t at_label = cg * (1 - label_smoothing);
    for (int64_t i = 0; i < e.n; ++i) {
      const int64_t j = e.col[i];
      gr[j] = static_cast<scalar_t>(ce && j == label ? e.g[i] - at_label : e.g[i]);
    }
  }

  static void rows(const SparseRows& a, int64_t begin, int64_t end) {
    const KDParams& p = a.p;
    const int64_t V = a.n_classes, K = a.k;
    const acc_t inv_t = p.inv_temperature, beta = p.beta, label_smoothing = p.label_smoothing;
    const acc_t log_beta = std::log(beta), log_1m_beta = std::log1p(-beta);
    const bool row_tail = a.tail && p.needs_soft;
    const bool smoothing = p.needs_ce && label_smoothing > 0;
    // The pass's sums: at T for the tail, at 1 for the CE unless those at T (T = 1) serve.
    const bool at_t = row_tail, at_1 = p.needs_ce && !(at_t && inv_t == acc_t(1));
    Kept kept;
    if (a.grad) {
      const int64_t padded = (V + W - 1) / W * W;
      if (at_t) kept.e_t.resize(padded);
      if (at_1) kept.e_1.resize(padded);
      kept.m.resize((V + kChunk - 1) / kChunk * W);
    }
    Entries e(K);
    std::vector<std::pair<int64_t, int64_t>> order;  // (index, entry)
    order.reserve(K);
    const bool has_pass = row_tail || p.needs_ce;
    for (int64_t row = begin; row < end; ++row) {
      if (!has_pass && row + 1 < end) prefetch_entries(a, row + 1);
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
      // An index counts at its first read occurrence that the mask keeps: sorted by (index,
      // entry), the first of each index.
      order.clear();
      for (int64_t k = 0; k < K; ++k) {
        if (mk && !mk[k]) continue;
        TORCH_CHECK_VALUE(idx[k] >= 0 && idx[k] < V, "sparse_kd_loss: teacher_indices must be in [0, ", V,
                          ") where teacher_mask is True; got ", idx[k], " at row ", row, ", entry ", k);
        order.emplace_back(idx[k], k);
      }
      std::sort(order.begin(), order.end());
      e.n = 0;
      for (size_t i = 0; i < order.size(); ++i) {
        if (i > 0 && order[i].first == order[i - 1].first) continue;
        e.col[e.n] = order[i].first;
        e.lp[e.n++] = lpr[order[i].second];
      }
      e.padded = Entries::pad(e.n);
      std::fill(e.lp.begin() + e.n, e.lp.begin() + e.padded, kNegInf);
      // The pass over the row: the softmax statistics at T of the columns not listed ("tail")
      // and at 1 of all of them (the CE: under "tail" the unlisted columns', then the listed
      // ones merged). It brings the entries' columns into the cache for what follows.
      Stats unlisted, ce;
      unlisted.scale = inv_t;
      acc_t sum_x = 0;
      if (has_pass) {
        const int64_t* lb = e.col.data();
        const Lanes lanes =
            pass(s, V, lb, row_tail ? lb + e.n : lb, inv_t, at_t, at_1, smoothing, gr ? &kept : nullptr);
        if (row_tail) unlisted = row_stats(lanes.max, lanes.sum_t, inv_t);
        if (p.needs_ce) {
          ce = row_stats(lanes.max, at_1 ? lanes.sum_1 : lanes.sum_t, acc_t(1));
          if (smoothing) sum_x = IO::sum(lanes.sum_x);
        }
      }
      acc_t row_loss = 0, big_g = 0, g_tail = 0;
      SparseRowConsts<acc_t> c{};
      if (p.needs_soft) {
        e.gather(s);
        if (row_tail && p.needs_ce) ce.merge(buffer_stats(e.x.data(), e.padded, acc_t(1)));
        c = sparse_row_consts(a.tail, e.n == V, inv_t, buffer_stats(e.lp.data(), e.padded, inv_t),
                              buffer_stats(e.lp.data(), e.padded, acc_t(1)),
                              buffer_stats(e.x.data(), e.padded, inv_t), unlisted);
        acc_t row_d;
        std::tie(row_d, big_g) = entry_buckets(e, c, p.divergence, beta, log_beta, log_1m_beta);
        if (a.tail) {
          const SparseBucket<acc_t> b =
              sparse_bucket(p.divergence, c.logp_tail, c.logq_tail, beta, log_beta, log_1m_beta);
          row_d += b.d;
          big_g += g_tail = b.g;
        }
        row_loss += acc_t(p.soft_weight) * row_d;
      }
      const acc_t lse1 = lse_from_sum(ce.max, ce.sum);
      if (p.needs_ce) {
        row_loss += acc_t(p.alpha) * (lse1 - ce_linear_part(true, acc_t(s[label]), sum_x, label_smoothing, V));
      }
      out = row_loss;
      if (!gr) continue;
      const acc_t sg = acc_t(p.soft_grad_weight * a.grad_scale), cg = acc_t(p.alpha * a.grad_scale);
      if (has_pass) {
        grad(gr, V, label, c, kept, row_tail, p.needs_ce, !at_1, sg, g_tail, big_g, cg, lse1, label_smoothing,
             a.stream_grad);
      } else {  // "renormalize" without the CE: no column but the entries' has a gradient
        zero(gr, V, a.stream_grad);
      }
      if (p.needs_soft) entries_grad(gr, e, c, big_g, sg, p.needs_ce, cg, lse1, label, label_smoothing, V);
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
