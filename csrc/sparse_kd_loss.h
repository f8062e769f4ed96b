// sparse_kd_loss (schema: lepton_fast/ops/sparse_kd_loss.py): the per-row math shared by the
// CPU and CUDA kernels; the buckets are lepton_fast.reference.sparse_buckets' and
// kernels/sparse_kd_loss.py (Triton) runs the same formulas.
//
// A row's buckets b are its counted entries k (and, under "tail", the classes not listed as
// one more bucket), with teacher and student log-probabilities logp_b, logq_b. With
// g_b = dD/d(log Q_b) and G = sum_b g_b, the soft term's gradient in z = x / T is
//   g_k - Q_k G                   at an entry's column k,
//   pu_j g_tail - p_j G           at a column j not listed ("tail"; 0 under "renormalize"),
// p = softmax(z) over the row and pu = softmax(z) over the columns not listed (pu_j = p_j /
// Q_tail: the student's tail mass never appears as a divisor).
//
// The student's tail is the log-sum-exp of the columns not listed, accumulated over them
// (never the row's sum minus the entries': at T <= 1e-2 the tail is far below float32's
// epsilon of the row's sum, and the subtraction left 0, an infinite forward KL). The row's
// statistics are those of the unlisted columns merged with the entries'.
#pragma once

#include <cmath>
#include <limits>

#include "kd_loss.h"

namespace lepton_fast {

// The vocabulary-parallel split (ops sparse_slice_stats and sparse_slice_grad, schemas and
// formulas in lepton_fast/ops/sparse_kd_loss.py; CPU kernels only): the columns of a slice's
// statistics, against the slice's own maxima, then the K entries' logits ...
enum SparseStat : int { kSpMax = 0, kSpMaxUnlisted, kSpSum, kSpSumUnlisted, kSpSumCE, kSpLinCE, kSpEntries };
// ... and of a row's gradient coefficients, then the K entries' own.
enum SparseGradCoef : int {
  kGrMax = 0, kGrMaxUnlisted, kGrConst, kGrSoftmax, kGrUnlisted, kGrSoftmaxCE, kGrLabel, kGrEntries
};

// The student's logits as every kernel of the family reads them: [N, C] rows contiguous along C,
// of one of the four dtypes.
inline void check_sparse_student(const char* op, const at::Tensor& student_logits) {
  LF_CHECK_ROWS(student_logits);
  const auto dtype = student_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": student_logits must be float32, float64, bfloat16 or float16, got ", dtype);
}

// sparse_kd_loss's arguments as the CPU and CUDA kernels read them: checked, the teacher's
// tensors and the labels contiguous (mask, labels undefined when not given), its
// log-probabilities in the logits' op-math type, the hyper-parameters resolved.
struct SparseKDLossCall {
  const at::Tensor& student_logits;
  at::Tensor indices, logprobs, mask, labels;
  KDParams p;
  bool tail;
  Reduction how;
  const std::optional<at::Tensor>& num_items_in_batch;
};

// The schema's C++ signature, written once for every device: the checks and preparation the
// kernels share, then `kernel`, the device's part. Each device registers
// sparse_kd_loss_entry<its kernel> (the indices' range is checked where each kernel reads them).
template <std::tuple<at::Tensor, at::Tensor> (*kernel)(const SparseKDLossCall&)>
std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_entry(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& teacher_mask, const std::optional<at::Tensor>& labels,
    const at::Tensor& hyper, c10::string_view truncation, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  const char* op = "sparse_kd_loss";
  check_sparse_student(op, student_logits);
  const auto dtype = student_logits.scalar_type();
  TORCH_CHECK(teacher_indices.dim() == 2 && teacher_indices.size(0) == student_logits.size(0), op,
              ": teacher_indices must be [N, K]");
  LF_CHECK_DTYPE(teacher_indices, at::kLong);
  LF_CHECK_SHAPE(teacher_logprobs, teacher_indices.size(0), teacher_indices.size(1));
  LF_CHECK_DEVICE(teacher_indices, student_logits);
  LF_CHECK_DEVICE(teacher_logprobs, student_logits);
  if (teacher_mask) {
    LF_CHECK_SHAPE(*teacher_mask, teacher_indices.size(0), teacher_indices.size(1));
    LF_CHECK_DTYPE(*teacher_mask, at::kBool);
    LF_CHECK_DEVICE(*teacher_mask, student_logits);
  }
  if (labels) {
    LF_CHECK_SHAPE(*labels, student_logits.size(0));
    LF_CHECK_DTYPE(*labels, at::kLong);
    LF_CHECK_DEVICE(*labels, student_logits);
  }
  TORCH_CHECK(truncation == "renormalize" || truncation == "tail", op, ": truncation must be 'renormalize' or 'tail'");
  return kernel({student_logits, teacher_indices.contiguous(),
                 teacher_logprobs.to(at::toOpMathType(dtype)).contiguous(),
                 teacher_mask ? teacher_mask->contiguous() : at::Tensor(), labels ? labels->contiguous() : at::Tensor(),
                 make_kd_params(hyper, ignore_index, labels.has_value(), compute_grad), truncation == "tail",
                 parse_reduction(reduction), num_items_in_batch});
}

// One bucket's divergence term and g = dD/d(log Q), (logp, logq) the teacher's and the
// student's log-probabilities; 0 log 0 = 0 on either side. V is a scalar (math policy
// ScalarMath) or, on the CPU, a SIMD vector of buckets (VecMath): a lane of -inf on both
// sides (a padding lane) has d = g = 0.
template <typename V>
struct SparseBucket {
  V d, g;
};

template <typename V, typename M = ScalarMath<V>>
LF_HOST_DEVICE SparseBucket<V> sparse_bucket(Divergence div, V logp, V logq, V beta, V log_beta, V log_1m_beta) {
  if (div == Divergence::kForwardKL) return {kl_term<V, M>(logp, logq), -M::exp(logp)};
  const V q = M::exp(logq);
  if (div == Divergence::kReverseKL) return {kl_term<V, M>(logq, logp), weighted<M>(q, logq - logp)};
  const V lm = log_mixture_of<M>(logq, logp, log_beta, log_1m_beta);
  return {beta * kl_term<V, M>(logp, lm) + (V(1) - beta) * kl_term<V, M>(logq, lm),
          (V(1) - beta) * weighted<M>(q, logq - lm)};
}

// A row's constants, from online softmax statistics (csrc/kd_loss.h, SoftmaxStats;
// maxima of the raw values, exponents (x - max) / T) of its counted entries' teacher
// log-probabilities lp at T and at 1, their student logits x_k at T, and (under "tail") the
// student's unlisted columns at T. `covers`: the counted entries list every class.
template <typename acc_t>
struct SparseRowConsts {
  acc_t inv_t;
  acc_t max_t, log_sum_t, log_listed;  // teacher: L = exp(log_listed) spread as softmax(lp / T)
  acc_t max_s, log_sum_s;  // student: softmax(z) over the row ("tail") or the entries
  acc_t max_u, log_sum_u;  // student: softmax(z) over the columns not listed ("tail")
  acc_t logp_tail, logq_tail;  // -inf under "renormalize"

  // An entry's teacher and student buckets, for one entry (V = acc_t) or a vector of them.
  template <typename V = acc_t>
  LF_HOST_DEVICE V logp(V lp) const {
    return log_listed == -std::numeric_limits<acc_t>::infinity()
               ? V(log_listed)
               : (lp - V(max_t)) * V(inv_t) - V(log_sum_t) + V(log_listed);
  }
  template <typename V = acc_t>
  LF_HOST_DEVICE V logq(V x) const {
    return (x - V(max_s)) * V(inv_t) - V(log_sum_s);
  }
  LF_HOST_DEVICE acc_t p(acc_t x) const { return std::exp(logq(x)); }  // softmax(z)_j over the row ("tail")
  LF_HOST_DEVICE acc_t pu(acc_t x) const {  // softmax(z)_j over the unlisted columns, 0 where there are none
    return max_u == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp((x - max_u) * inv_t - log_sum_u);
  }
};

// NaN where a softmax that the buckets need is undefined (log_sum in common.h): no finite
// student logit (or, under "renormalize", none at the entries), every teacher entry -inf
// under "renormalize", a +inf or NaN read.
template <typename acc_t>
LF_HOST_DEVICE SparseRowConsts<acc_t> sparse_row_consts(bool tail, bool covers, acc_t inv_t,
                                                        const SoftmaxStats<acc_t>& teacher_t,
                                                        const SoftmaxStats<acc_t>& teacher_1,
                                                        SoftmaxStats<acc_t> student,
                                                        const SoftmaxStats<acc_t>& unlisted) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  SparseRowConsts<acc_t> c{inv_t, teacher_t.max, 0, 0, kNegInf, 0, kNegInf, 0, kNegInf, kNegInf};
  if (!tail) {
    c.log_sum_t = log_sum(teacher_t.max, teacher_t.sum);
    c.max_s = student.max;
    c.log_sum_s = log_sum(student.max, student.sum);
    return c;
  }
  // L = min(1, sum exp(lp)), 1 when the entries cover the row (what is left is rounding);
  // a row with no entry, or only entries of probability 0, has L = 0 (log -inf, no NaN).
  const acc_t lse_lp = teacher_1.max + std::log(teacher_1.sum);
  c.log_listed = covers ? acc_t(0) : (lse_lp > 0 ? acc_t(0) : lse_lp);  // (NaN stays NaN)
  c.logp_tail = std::log(-std::expm1(c.log_listed));  // log(1 - L), exact for L near 1
  if (c.log_listed != kNegInf) c.log_sum_t = std::log(teacher_t.sum);
  student.merge(unlisted);
  c.max_s = student.max;
  c.log_sum_s = log_sum(student.max, student.sum);
  if (unlisted.max != kNegInf && unlisted.sum > 0) {
    c.max_u = unlisted.max;
    c.log_sum_u = std::log(unlisted.sum);
    c.logq_tail = (unlisted.max - c.max_s) * inv_t + c.log_sum_u - c.log_sum_s;
  } else {
    c.logq_tail = c.log_sum_s == c.log_sum_s ? kNegInf : c.log_sum_s;  // keep an undefined row NaN
  }
  return c;
}

// The soft term's gradient in z at a column not listed (0 under "renormalize").
template <typename acc_t>
LF_HOST_DEVICE acc_t sparse_unlisted_grad(const SparseRowConsts<acc_t>& c, acc_t x, acc_t g_tail, acc_t big_g) {
  using M = ScalarMath<acc_t>;  // 0 where a probability is 0, also against an infinite g
  return weighted<M>(c.pu(x), g_tail) - weighted<M>(c.p(x), big_g);
}

}  // namespace lepton_fast
