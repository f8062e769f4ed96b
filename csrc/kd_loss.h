// Knowledge-distillation loss: the per-row math shared by the CPU and CUDA kernels.
// Notation (one row): z = logits / T, lse = logsumexp(z), log p_j = z_j - lse. The kernels keep
// the max of the raw logits and exponents (x - max) / T (common.h, log_sum): exact at the max for
// every T in the documented range [1e-8, 1e4].
//   forward KL  D = sum_j p_t (log p_t - log p_s)        dD/dz_s = p_s - p_t
//   reverse KL  D = sum_j p_s (log p_s - log p_t)        dD/dz_s = p_s (d - D), d = log p_s - log p_t
//   JSD(beta)   D = beta KL(p_t||m) + (1-beta) KL(p_s||m), m = beta p_t + (1-beta) p_s
//               dD/dz_s = (1-beta) p_s (d - K_s), d = log p_s - log m, K_s = KL(p_s||m)
//   CE (T = 1, label smoothing ls): lse1 - (1-ls) s_y - ls/C sum_j s_j, d/ds = q - (1-ls) 1[y] - ls/C
// row loss = alpha CE + (1 - alpha) c D, c = T^2 or 1; d/ds = alpha dCE/ds + (1 - alpha) c / T dD/dz_s.
//
// Every kernel computes a row in the same steps, which also run on a slice of the row's
// columns (the vocabulary-parallel loss, lepton_fast/distributed.py, where each rank holds one):
//   1. statistics of the row (or slice): KDRowStats below, which merge across slices;
//   2. JSD only: with both log-sum-exps known, the sums K_t = KL(p_t || m), K_s = KL(p_s || m),
//      which add up across slices;
//   3. from the row's statistics (and sums), its constants and loss: kd_row_consts;
//   4. the gradient of each column, from the constants.
// fused_kd_loss runs the four in one kernel call per row; the kd_slice_* ops run 1, 2 and
// 3 + 4 on a slice, and the caller merges in between (lepton_fast/ops/kd_loss.py).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "common.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>


namespace lepton_fast {

// The codes of lepton_fast._validate.DIVERGENCES.
enum class Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// The KD ops' hyper-parameters travel packed, as one 1-D float64 CPU tensor `hyper` (every KD
// schema's argument), entries in the order of lepton_fast._validate.KD_FIELDS, which packs them.
// Only make_kd_params reads it: the entry points pass it through, so a new hyper-parameter is
// an entry here and a field of KDParams, not an argument of every kernel's signature.
enum KDHyper : int {
  kHyperTemperature = 0,
  kHyperDivergence,  // a Divergence code
  kHyperBeta,
  kHyperAlpha,
  kHyperLabelSmoothing,
  kHyperScaleByT2,  // 0 or 1
  kNumKDHyper
};

// The hyper-parameters of a KD op, resolved once per call in double precision (each kernel
// rounds them to its accumulation type). Their values were checked in Python:
// temperature > 0, beta, alpha and label_smoothing in [0, 1], labels given when alpha > 0.
struct KDParams {
  double inv_temperature;
  Divergence divergence;
  double beta;
  double alpha;
  double label_smoothing;
  int64_t ignore_index;
  double soft_weight;  // (1 - alpha) * (T^2 or 1): multiplies D
  double soft_grad_weight;  // soft_weight / T: multiplies dD/dz_s
  bool has_labels;
  bool compute_grad;
  bool needs_ce;  // alpha > 0
  bool needs_soft;  // alpha < 1
};

// The checks of the KD ops' tensors that the CPU and CUDA kernels share. `op` names the op in
// the messages; a slice of the rows' columns (the kd_slice_* ops) is the student's
// C_r = size(1) columns at class_offset of rows of n_classes columns (0: not checked).
inline void check_kd_inputs(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const std::optional<at::Tensor>& labels, int64_t class_offset = 0,
                            int64_t n_classes = 0) {
  LF_CHECK_ROWS(student_logits);
  LF_CHECK_ROWS(teacher_logits);
  TORCH_CHECK(teacher_logits.sizes() == student_logits.sizes(), op, ": logits shapes differ");
  TORCH_CHECK(student_logits.scalar_type() == teacher_logits.scalar_type(), op, ": logits dtypes differ");
  LF_CHECK_DEVICE(teacher_logits, student_logits);
  if (labels) {
    LF_CHECK_SHAPE(*labels, student_logits.size(0));
    LF_CHECK_DEVICE(*labels, student_logits);
  }
  const int64_t slice_classes = student_logits.size(1);
  TORCH_CHECK_VALUE(n_classes == 0 || (class_offset >= 0 && class_offset + slice_classes <= n_classes), op,
                    ": a slice of ", slice_classes, " columns at class_offset=", class_offset,
                    " does not fit in n_classes=", n_classes);
}

// Merged statistics (or JSD sums) of every row, [N, width] in the logits' accumulation type,
// as kd_slice_jsd_sums and kd_slice_loss take them.
inline void check_merged_stats(const char* op, const at::Tensor& x, const at::Tensor& student, int64_t width) {
  const auto acc = at::toOpMathType(student.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == student.size(0) && x.size(1) == width && x.is_contiguous(), op,
              ": merged statistics must be a contiguous [", student.size(0), ", ", width, "] tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == acc, op, ": merged statistics must be ", acc, ", got ", x.scalar_type());
  LF_CHECK_DEVICE(x, student);
}

inline KDParams make_kd_params(const at::Tensor& hyper, int64_t ignore_index, bool has_labels, bool compute_grad) {
  LF_CHECK_DTYPE(hyper, at::kDouble);
  LF_CHECK_SHAPE(hyper, kNumKDHyper);
  TORCH_CHECK(hyper.device().is_cpu() && hyper.is_contiguous(),
              "hyper must be a contiguous CPU tensor (lepton_fast._validate.kd_hyper packs it), got one on ",
              hyper.device());
  const double* h = hyper.const_data_ptr<double>();
  const double t = h[kHyperTemperature], beta = h[kHyperBeta], alpha = h[kHyperAlpha];
  const double code = h[kHyperDivergence];
  TORCH_CHECK(code == 0 || code == 1 || code == 2, "hyper: the divergence code must be 0, 1 or 2, got ", code);
  KDParams p;
  p.divergence = static_cast<Divergence>(static_cast<int>(code));
  // The JSD at beta 0 / 1 is exactly forward / reverse KL (its mixture is then one of the two
  // distributions), and runs as such (lepton_fast.ops.kd_loss.soft_kind).
  if (p.divergence == Divergence::kJSD && (beta == 0 || beta == 1)) {
    p.divergence = beta == 0 ? Divergence::kForwardKL : Divergence::kReverseKL;
  }
  const double scale = h[kHyperScaleByT2] != 0 ? t * t : 1.0;
  p.inv_temperature = 1.0 / t;
  p.beta = beta;
  p.alpha = alpha;
  p.label_smoothing = h[kHyperLabelSmoothing];
  p.ignore_index = ignore_index;
  p.soft_weight = (1.0 - alpha) * scale;
  p.soft_grad_weight = (1.0 - alpha) * scale / t;
  p.has_labels = has_labels;
  p.compute_grad = compute_grad;
  p.needs_ce = alpha > 0;
  p.needs_soft = alpha < 1;
  return p;
}

// ---------------------------------------------------------------------------------------
// The same per-element terms for any value type: a scalar (CUDA, CPU) or a SIMD vector (the
// CPU kernel's at::vec::Vectorized). A math policy M supplies the few operations whose
// spelling differs (ScalarMath below; csrc/cpu/kd_loss_rows.h has the vector one):
//   M::exp, M::log1p (asked for on [0, 1] only), M::max, M::min,
//   M::zero_where_zero(p, x) = p == 0 ? 0 : x,  M::keep_neg_inf(h, x) = h == -inf ? h : x.

template <typename acc_t>
struct ScalarMath {
  using V = acc_t;
  static LF_HOST_DEVICE V exp(V x) { return std::exp(x); }
  static LF_HOST_DEVICE V log1p(V x) { return std::log1p(x); }
  static LF_HOST_DEVICE V max(V a, V b) { return a > b ? a : b; }
  static LF_HOST_DEVICE V min(V a, V b) { return a > b ? b : a; }
  static LF_HOST_DEVICE V zero_where_zero(V p, V x) { return p == V(0) ? V(0) : x; }
  static LF_HOST_DEVICE V keep_neg_inf(V h, V x) { return h == -std::numeric_limits<V>::infinity() ? h : x; }
};

// p * d with 0 * d = 0 for every d: a term of a KL sum (0 log 0 = 0; a class p rules out adds
// nothing, also where d is +-inf), or the gradient p_s (d - K) of reverse KL and JSD.
template <typename M, typename V = typename M::V>
LF_HOST_DEVICE V weighted(V p, V d) {
  return M::zero_where_zero(p, p * d);
}

// log(beta p_t + (1 - beta) p_s) in log space (no underflow of the mixture), -inf where both are 0.
template <typename M, typename V = typename M::V>
LF_HOST_DEVICE V log_mixture_of(V logp_s, V logp_t, V log_beta, V log_1m_beta) {
  const V a = logp_t + log_beta, b = logp_s + log_1m_beta;
  const V hi = M::max(a, b), lo = M::min(a, b);
  return M::keep_neg_inf(hi, hi + M::log1p(M::exp(lo - hi)));
}

// KL(p || q) of softmax(x_p / T) and softmax(x_q / T) from one pass of online sums over the row.
// With m_p, m_q the maxima of the raw logits and each logit's offset from its row's max,
//   u_j = (x_p,j - m_p) / T <= 0,  v_j = (x_q,j - m_q) / T <= 0,
//   S_p = sum_j exp(u_j),  S_q = sum_j exp(v_j),  A = sum_j exp(u_j) (u_j - v_j),
//   KL = A / S_p + log(S_q / S_p).
// Forward KL is p = teacher, q = student; reverse KL the other way round. Every term is an
// offset from a max: the raw form, E_p[x_p - x_q] / T + (m_q - m_p) / T + ..., cancels two terms
// of size |x_p - x_q| / T, which left float32 an error of ulp(|x_p - x_q|) / T (about 1 at
// T = 1e-6 and logits near 50, 1e2 at T = 1e-8).
template <typename acc_t>
LF_HOST_DEVICE acc_t kl_from_sums(acc_t a, acc_t s_p, acc_t s_q) {
  return a / s_p + std::log(s_q / s_p);
}

// kl_from_sums' A re-centred when the maxima rise by d_p, d_q >= 0 (a running max that moves,
// or a part of the row merged into the whole): each u_j - v_j gains (d_q - d_p) / T and each
// exp(u_j) the factor r_p = exp(-d_p / T), so, with shift = (d_q - d_p) / T,
//   A' = r_p (A + S_p shift),
// 0 where r_p underflows (the part's p is negligible) and S_p shift 0 where S_p is 0 (a part
// with no p yet, whose shift may be inf or NaN).
template <typename M, typename V = typename M::V>
LF_HOST_DEVICE V recentred_kl_sum(V a, V s_p, V r_p, V shift) {
  return M::zero_where_zero(r_p, r_p * (a + weighted<M>(s_p, shift)));
}

// The part of a row's cross-entropy at T = 1 (label smoothing ls, C = n_classes in the row)
// that is linear in the logits x, over the columns of a slice of the row:
//   (1 - ls) x_label (when the label is in the slice) + ls / C sum_j x_j,
// the smoothing sum only when ls > 0, so that a -inf logit cannot turn an unsmoothed loss
// into NaN. The parts of a row's slices add up; the row's CE is lse(x) - their sum.
template <typename acc_t>
LF_HOST_DEVICE acc_t ce_linear_part(bool has_label, acc_t x_label, acc_t sum_x, acc_t label_smoothing,
                                    int64_t n_classes) {
  const acc_t smooth = label_smoothing > 0 ? label_smoothing / acc_t(n_classes) * sum_x : acc_t(0);
  return (has_label ? (1 - label_smoothing) * x_label : acc_t(0)) + smooth;
}

// Online softmax statistics of z = x * scale (scale = 1 / T > 0), one logit at a time or
// merged: the max of the raw x (-inf until a finite x comes) and the sum of exp((x_j - max) *
// scale). Entries with x = -inf add nothing.
template <typename acc_t>
struct SoftmaxStats {
  acc_t scale = 1;
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;

  LF_HOST_DEVICE void add(acc_t x) {
    if (x == -std::numeric_limits<acc_t>::infinity()) return;
    if (x > max) {
      sum = sum * std::exp((max - x) * scale) + 1;
      max = x;
    } else {
      sum += std::exp((x - max) * scale);
    }
  }
  LF_HOST_DEVICE void merge(const SoftmaxStats& o) {
    if (o.max == -std::numeric_limits<acc_t>::infinity()) return;
    if (o.max > max) {
      sum = sum * std::exp((max - o.max) * scale) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * std::exp((o.max - max) * scale);
    }
  }
};

// The online statistics of two distributions p and q over the same columns and kl_from_sums'
// centred sum A of KL(p || q), in one pass (the GPU kernels' step 1). A column's term is
// exp(u) (u - v) against the current maxima, and every rise of a max re-centres A first
// (recentred_kl_sum). A q of -inf where p > 0 makes A infinite, as the KL is.
template <typename acc_t>
struct KLSums {
  using M = ScalarMath<acc_t>;
  SoftmaxStats<acc_t> p, q;
  acc_t a = 0;

  LF_HOST_DEVICE void set_scale(acc_t scale) { p.scale = q.scale = scale; }

  LF_HOST_DEVICE void add(acc_t xp, acc_t xq) {
    const acc_t new_p = xp > p.max ? xp : p.max, new_q = xq > q.max ? xq : q.max;
    if (new_p != p.max || new_q != q.max) rise_to(new_p, new_q);
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    if (xp != kNegInf) {
      const acc_t e = std::exp((xp - p.max) * p.scale);
      p.sum += e;
      a += weighted<M>(e, ((xp - p.max) - (xq == kNegInf ? xq : xq - q.max)) * p.scale);
    }
    if (xq != kNegInf) q.sum += std::exp((xq - q.max) * q.scale);
  }
  LF_HOST_DEVICE void merge(const KLSums& o) {
    KLSums other = o;
    const acc_t new_p = M::max(p.max, o.p.max), new_q = M::max(q.max, o.q.max);
    rise_to(new_p, new_q);
    other.rise_to(new_p, new_q);
    p.sum += other.p.sum;
    q.sum += other.q.sum;
    a += other.a;
  }

 private:
  // How far a max rises to m >= max: 0 where it stays (at -inf too), inf from -inf.
  static LF_HOST_DEVICE acc_t rise(acc_t m, acc_t max) { return m == max ? acc_t(0) : m - max; }
  // Re-states the sums against maxima new_p >= p.max, new_q >= q.max.
  LF_HOST_DEVICE void rise_to(acc_t new_p, acc_t new_q) {
    const acc_t d_p = rise(new_p, p.max), d_q = rise(new_q, q.max);
    const acc_t r_p = std::exp(-d_p * p.scale);
    a = recentred_kl_sum<M>(a, p.sum, r_p, (d_q - d_p) * p.scale);
    p.sum *= r_p;
    q.sum *= std::exp(-d_q * q.scale);
    p.max = new_p;
    q.max = new_q;
  }
};

// p * (log p - log q) with 0 log 0 = 0: one term of a KL sum (of a scalar, or of a vector
// under its math policy M).
template <typename V, typename M = ScalarMath<V>>
LF_HOST_DEVICE V kl_term(V logp, V logq) {
  return weighted<M>(M::exp(logp), logp - logq);
}

// d(D)/d(z_s) of one element for the soft term (see the top of this file); 0 where p_s = 0
// for reverse KL and JSD. k_s is the row constant: D for reverse KL, KL(p_s || m) for JSD.
template <typename acc_t>
LF_HOST_DEVICE acc_t soft_grad(Divergence div, acc_t lps, acc_t lpt, acc_t k_s, acc_t beta, acc_t log_beta,
                               acc_t log_1m_beta) {
  using M = ScalarMath<acc_t>;
  const acc_t ps = std::exp(lps);
  switch (div) {
    case Divergence::kForwardKL: return ps - std::exp(lpt);
    case Divergence::kReverseKL: return weighted<M>(ps, lps - lpt - k_s);
    default: return (1 - beta) * weighted<M>(ps, lps - log_mixture_of<M>(lps, lpt, log_beta, log_1m_beta) - k_s);
  }
}

// ---------------------------------------------------------------------------------------
// Which of a row's steps a kernel call runs, and for which op.
enum class KDMode : int {
  kFused,  // fused_kd_loss: steps 1-4 on whole rows
  kStats,  // kd_slice_stats: step 1 on a slice
  kJSDSums,  // kd_slice_jsd_sums: step 2 on a slice, from the merged statistics
  kSlice,  // kd_slice_loss: steps 3-4 on a slice, from the merged statistics (and JSD sums)
};

// Step 1's statistics of one row over a slice of its columns (the whole row, or a part), of
// student (s) and teacher (t) logits x. Each max is the slice's max of the raw logits x (not of
// z = x / T), -inf where the slice has no finite x (its sums are then 0); each sum is of
// exp((x - max) / T). kd_slice_stats writes them as the columns KDStat of an [N, 7] tensor.
//   kl: kl_from_sums' A against the slice's two maxima, p = teacher for forward KL, p =
//       student for reverse KL; 0 for JSD;
//   sum_ce: sum exp(x_s - max_s), the CE's softmax at T = 1 (= sum_s at T = 1);
//   lin_ce: ce_linear_part over the slice.
// Slices merge as online-softmax statistics do: max = the largest max; each sum times
// exp((its max - max) / T) (sum_ce: exp(its max - max)), with 0 for a slice whose max is -inf
// and 0 * inf = 0, kl re-centred on both merged maxima (recentred_kl_sum); then sums add, and
// lin_ce adds.
enum KDStat : int { kStatMaxS = 0, kStatMaxT, kStatSumS, kStatSumT, kStatKL, kStatSumCE, kStatLinCE, kNumKDStats };

template <typename acc_t>
struct KDRowStats {
  acc_t max_s, max_t, sum_s, sum_t, kl, sum_ce, lin_ce;

  LF_HOST_DEVICE void store(acc_t* out) const {
    out[kStatMaxS] = max_s;
    out[kStatMaxT] = max_t;
    out[kStatSumS] = sum_s;
    out[kStatSumT] = sum_t;
    out[kStatKL] = kl;
    out[kStatSumCE] = sum_ce;
    out[kStatLinCE] = lin_ce;
  }
  LF_HOST_DEVICE static KDRowStats load(const acc_t* in) {
    return {in[kStatMaxS], in[kStatMaxT], in[kStatSumS], in[kStatSumT], in[kStatKL], in[kStatSumCE], in[kStatLinCE]};
  }
};

// Step 3's constants of a row: the maxima of the raw logits and the log-sums (log_sum in
// common.h: log p_j = (x_j - max) / T - lse), the CE's logsumexp at T = 1, the row constant k of
// the soft gradient (D for reverse KL, K_s for JSD, see soft_grad) and the row's loss, NaN where a
// softmax is undefined.
template <typename acc_t>
struct KDRowConsts {
  acc_t max_s, max_t, lse_s, lse_t, lse_ce, k, loss;
};

// From a row's statistics over all its columns; k_t, k_s are JSD's step-2 sums (else unused).
template <typename acc_t>
LF_HOST_DEVICE KDRowConsts<acc_t> kd_row_consts(const KDRowStats<acc_t>& st, const KDParams& p, acc_t k_t, acc_t k_s) {
  KDRowConsts<acc_t> c{st.max_s, st.max_t, 0, 0, 0, 0, 0};
  if (p.needs_soft) {
    const acc_t inv_t = p.inv_temperature;
    c.lse_s = log_sum(st.max_s, st.sum_s);
    c.lse_t = log_sum(st.max_t, st.sum_t);
    acc_t div;
    if (p.divergence == Divergence::kForwardKL) {
      div = kl_from_sums(st.kl, st.sum_t, st.sum_s);
    } else if (p.divergence == Divergence::kReverseKL) {
      div = kl_from_sums(st.kl, st.sum_s, st.sum_t);
      c.k = div;
    } else {
      const acc_t beta = p.beta;
      div = beta * k_t + (1 - beta) * k_s;
      c.k = k_s;
    }
    // An entirely -inf (or NaN) row must come out NaN, whatever the sums.
    if (c.lse_s != c.lse_s || c.lse_t != c.lse_t) div = std::numeric_limits<acc_t>::quiet_NaN();
    c.loss = acc_t(p.soft_weight) * div;
  }
  if (p.needs_ce) {
    c.lse_ce = lse_from_sum(st.max_s, st.sum_ce);
    c.loss += acc_t(p.alpha) * (c.lse_ce - st.lin_ce);
  }
  return c;
}

}  // namespace lepton_fast
