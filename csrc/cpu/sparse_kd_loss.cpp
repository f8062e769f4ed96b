// CPU kernel of sparse_kd_loss (schema: lepton_fast/ops/sparse_kd_loss.py), the contract of the
// reference kernel; the buckets are lepton_fast.reference.sparse_buckets', the formulas those
// of kernels/sparse_kd_loss.py (its docstring derives the gradient). Rows in parallel
// (at::parallel_for); each row in plain scalar loops, the student row read once for its
// softmax statistics and once for the gradient. Unlike fused_kd_loss's row kernels this one is
// not vectorised with at::vec nor compiled per ISA: the work per row is two streaming passes
// that the compiler vectorises poorly only in the exp; that tuning is left for later.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common.h"

namespace lepton_fast {
namespace cpu {
namespace {

enum class Div { kForward, kReverse, kJSD };

struct SparseArgs {
  const void* student;
  const int64_t* indices;
  const void* logprobs;  // in the accumulation dtype
  const bool* mask;      // or nullptr
  const int64_t* labels;  // or nullptr
  void* grad;            // or nullptr
  void* rows;
  int64_t n_classes, k, s_stride, ignore_index;
  Div div;
  bool tail, needs_soft, needs_ce;
  double inv_t, beta, log_beta, log_1m_beta, alpha, label_smoothing, soft_w, soft_gw, grad_scale;
};

template <typename acc_t>
acc_t kl_term(acc_t logp, acc_t logq) {  // p (log p - log q), 0 log 0 = 0
  return logp == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp(logp) * (logp - logq);
}

template <typename acc_t>
acc_t log_mixture(acc_t lq, acc_t lp, acc_t log_beta, acc_t log_1m_beta) {  // log(beta p + (1 - beta) q)
  const acc_t a = lp + log_beta, b = lq + log_1m_beta, hi = std::max(a, b), lo = std::min(a, b);
  return hi == -std::numeric_limits<acc_t>::infinity() ? hi : hi + std::log1p(std::exp(lo - hi));
}

// Over the i where use[i]: the max m of x[i] and log sum exp((x[i] - m) * scale), the max
// subtracted before the scaling (csrc/common.h, log_sum); both -inf when none is above -inf.
// log softmax(x * scale)_i is then (x[i] - m) * scale - the result.
template <typename acc_t>
acc_t log_sum_where(const std::vector<acc_t>& x, const std::vector<char>& use, acc_t scale, acc_t& m) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  m = neg_inf;
  for (size_t i = 0; i < x.size(); ++i)
    if (use[i]) m = std::max(m, x[i]);
  if (m == neg_inf) return m;
  acc_t s = 0;
  for (size_t i = 0; i < x.size(); ++i)
    if (use[i]) s += std::exp((x[i] - m) * scale);
  return std::log(s);
}

template <typename scalar_t>
void sparse_rows(const SparseArgs& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t V = a.n_classes, K = a.k;
  const acc_t inv_t = a.inv_t, beta = a.beta, log_beta = a.log_beta, log_1m_beta = a.log_1m_beta,
              label_smoothing = a.label_smoothing;
  std::vector<char> counted(K);
  std::vector<acc_t> xk(K), lp(K), logp(K), lq(K), g(K);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* s = static_cast<const scalar_t*>(a.student) + row * a.s_stride;
    scalar_t* gr = a.grad ? static_cast<scalar_t*>(a.grad) + row * V : nullptr;
    acc_t& out = static_cast<acc_t*>(a.rows)[row];
    const int64_t label = a.labels ? a.labels[row] : -1;
    if (a.labels && label == a.ignore_index) {
      out = 0;
      if (gr) std::fill(gr, gr + V, scalar_t(0));
      continue;
    }
    const int64_t* idx = a.indices + row * K;
    const acc_t* lpr = static_cast<const acc_t*>(a.logprobs) + row * K;
    const bool* mk = a.mask ? a.mask + row * K : nullptr;
    int64_t n_counted = 0;
    for (int64_t k = 0; k < K; ++k) {  // an index counts at its first read occurrence
      bool c = !mk || mk[k];
      if (c) {
        TORCH_CHECK_VALUE(idx[k] >= 0 && idx[k] < V, "sparse_kd_loss: teacher_indices must be in [0, ", V,
                          ") where teacher_mask is True; got ", idx[k], " at row ", row, ", entry ", k);
        for (int64_t j = 0; j < k && c; ++j) c = !(counted[j] && idx[j] == idx[k]);
      }
      counted[k] = c;
      n_counted += c;
      xk[k] = c ? acc_t(s[idx[k]]) : neg_inf;
      lp[k] = c ? lpr[k] : neg_inf;
    }
    // The pass over the row: softmax statistics at T (tail) and at T = 1 (the CE), each the max
    // of the raw logits and the sum of exp((x - max) / T).
    acc_t m = neg_inf, l = 0, m1 = neg_inf, l1 = 0, sum_x = 0;
    const bool row_tail = a.tail && a.needs_soft;
    if (row_tail || a.needs_ce) {
      for (int64_t j = 0; j < V; ++j) {
        const acc_t x = s[j];
        if (row_tail) {
          if (x > m) {
            l = l * std::exp((m - x) * inv_t) + 1;
            m = x;
          } else if (x != neg_inf) {
            l += std::exp((x - m) * inv_t);
          }
        }
        if (a.needs_ce) {
          if (x > m1) {
            l1 = l1 * std::exp(m1 - x) + 1;
            m1 = x;
          } else if (x != neg_inf) {
            l1 += std::exp(x - m1);
          }
          sum_x += x;
        }
      }
    }
    const acc_t log_l_all = log_sum(m, l);  // log softmax(x / T)_j = (x_j - m) / T - log_l_all
    acc_t row_loss = 0, big_g = 0, r = 0;
    if (a.needs_soft) {
      acc_t m_t;
      const acc_t log_l_t = log_sum_where(lp, counted, inv_t, m_t);  // the teacher's, as log_l_all
      acc_t lp_tail = neg_inf, lq_tail = neg_inf;
      if (a.tail) {
        acc_t m_lp;
        const acc_t lse_lp = log_sum_where(lp, counted, acc_t(1), m_lp) + m_lp;
        const acc_t log_l = n_counted == V ? acc_t(0) : std::min(lse_lp, acc_t(0));
        acc_t s_listed = 0;
        for (int64_t k = 0; k < K; ++k) {
          logp[k] = counted[k] && log_l != neg_inf ? (lp[k] - m_t) * inv_t - log_l_t + log_l : neg_inf;
          lq[k] = counted[k] ? (xk[k] - m) * inv_t - log_l_all : neg_inf;
          if (counted[k]) s_listed += std::exp((xk[k] - m) * inv_t);
        }
        lp_tail = std::log(1 - std::exp(log_l));
        lq_tail = std::log(n_counted == V ? acc_t(0) : std::max(l - s_listed, acc_t(0)) / l);
      } else {
        acc_t m_z;
        const acc_t log_l_z = log_sum_where(xk, counted, inv_t, m_z);
        for (int64_t k = 0; k < K; ++k) {
          logp[k] = counted[k] ? (lp[k] - m_t) * inv_t - log_l_t : neg_inf;
          lq[k] = counted[k] ? (xk[k] - m_z) * inv_t - log_l_z : neg_inf;
        }
      }
      acc_t d = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t q = std::exp(lq[k]);
        if (a.div == Div::kForward) {
          d += kl_term(logp[k], lq[k]);
          g[k] = -std::exp(logp[k]);
        } else if (a.div == Div::kReverse) {
          d += kl_term(lq[k], logp[k]);
          g[k] = q == 0 ? acc_t(0) : q * (lq[k] - logp[k]);
        } else {
          const acc_t lm = log_mixture(lq[k], logp[k], log_beta, log_1m_beta);
          d += beta * kl_term(logp[k], lm) + (1 - beta) * kl_term(lq[k], lm);
          g[k] = q == 0 ? acc_t(0) : (1 - beta) * q * (lq[k] - lm);
        }
        if (counted[k]) big_g += g[k];
      }
      if (a.tail) {
        if (a.div == Div::kForward) {
          d += kl_term(lp_tail, lq_tail);
          r = lp_tail == neg_inf ? acc_t(0) : -std::exp(lp_tail - lq_tail);
        } else if (a.div == Div::kReverse) {
          d += kl_term(lq_tail, lp_tail);
          r = lq_tail - lp_tail;
        } else {
          const acc_t lm = log_mixture(lq_tail, lp_tail, log_beta, log_1m_beta);
          d += beta * kl_term(lp_tail, lm) + (1 - beta) * kl_term(lq_tail, lm);
          r = (1 - beta) * (lq_tail - lm);
        }
        if (lq_tail != neg_inf) big_g += std::exp(lq_tail) * r;
      }
      row_loss += acc_t(a.soft_w) * d;
    }
    const acc_t lse1 = lse_from_sum(m1, l1);
    if (a.needs_ce) {
      row_loss += acc_t(a.alpha) * (lse1 - (1 - label_smoothing) * acc_t(s[label]) - label_smoothing / V * sum_x);
    }
    out = row_loss;
    if (!gr) continue;
    const acc_t sg = acc_t(a.soft_gw * a.grad_scale), cg = acc_t(a.alpha * a.grad_scale);
    auto ce_grad = [&](int64_t j) {
      return cg * (std::exp(acc_t(s[j]) - lse1) - label_smoothing / V - (j == label ? 1 - label_smoothing : 0));
    };
    for (int64_t j = 0; j < V; ++j) {  // the unlisted columns' formula (the entries' come next)
      acc_t dv = 0;
      if (row_tail) {
        const acc_t p = std::exp((acc_t(s[j]) - m) * inv_t - log_l_all);
        // r = -inf: the student's tail mass rounded to 0 (below the sum's epsilon), and so do
        // the columns that make it up (p tiny, not yet 0, at T ~ 1e-2).
        dv = p == 0 || r == neg_inf ? acc_t(0) : p * (r - big_g) * sg;
      }
      if (a.needs_ce) dv += ce_grad(j);
      gr[j] = static_cast<scalar_t>(dv);
    }
    if (a.needs_soft) {
      for (int64_t k = 0; k < K; ++k) {
        if (!counted[k]) continue;
        acc_t dk = (g[k] - std::exp(lq[k]) * big_g) * sg;
        if (a.needs_ce) dk += ce_grad(idx[k]);
        gr[idx[k]] = static_cast<scalar_t>(dk);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& teacher_mask, const std::optional<at::Tensor>& labels,
    const at::Tensor& temperature, const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& label_smoothing,
    c10::string_view divergence, c10::string_view truncation, int64_t ignore_index, bool scale_by_t2,
    c10::string_view reduction, const std::optional<at::Tensor>& num_items_in_batch, bool compute_grad) {
  const char* op = "sparse_kd_loss";
  LF_CHECK_ROWS(student_logits);
  TORCH_CHECK(teacher_indices.dim() == 2 && teacher_indices.size(0) == student_logits.size(0), op,
              ": teacher_indices must be [N, K]");
  LF_CHECK_DTYPE(teacher_indices, at::kLong);
  LF_CHECK_SHAPE(teacher_logprobs, teacher_indices.size(0), teacher_indices.size(1));
  if (teacher_mask) {
    LF_CHECK_SHAPE(*teacher_mask, teacher_indices.size(0), teacher_indices.size(1));
    LF_CHECK_DTYPE(*teacher_mask, at::kBool);
  }
  TORCH_CHECK(truncation == "renormalize" || truncation == "tail", op, ": truncation must be 'renormalize' or 'tail'");
  const auto dtype = student_logits.scalar_type();
  const auto acc_type = at::toOpMathType(dtype);
  const int64_t n = student_logits.size(0), v = student_logits.size(1);
  const double t = scalar_arg(temperature, "temperature"), b = scalar_arg(beta, "beta");
  const double al = scalar_arg(alpha, "alpha");
  SparseArgs a{};
  at::Tensor idx = teacher_indices.contiguous();
  at::Tensor lp = teacher_logprobs.to(acc_type).contiguous();
  at::Tensor mask = teacher_mask ? teacher_mask->contiguous() : at::Tensor();
  at::Tensor labels64;
  int64_t n_valid = n;
  if (labels) {
    labels64 = labels->contiguous();
    LF_CHECK_DTYPE(labels64, at::kLong);
    const int64_t* y = labels64.const_data_ptr<int64_t>();
    n_valid = 0;
    for (int64_t i = 0; i < n; ++i) {  // the labels' range, checked where they are read
      if (y[i] == ignore_index) continue;
      TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < v, op, ": labels must be in [0, ", v, ") or equal ignore_index=",
                        ignore_index, "; got ", y[i], " at row ", i);
      ++n_valid;
    }
  }
  // The JSD's ends are the KLs exactly (as every KD kernel runs them).
  a.div = divergence == "forward_kl" ? Div::kForward : divergence == "reverse_kl" ? Div::kReverse : Div::kJSD;
  if (a.div == Div::kJSD && (b == 0.0 || b == 1.0)) a.div = b == 0.0 ? Div::kForward : Div::kReverse;
  const Reduction how = parse_reduction(reduction);
  double divisor = 1;
  if (num_items_in_batch) {
    divisor = scalar_arg(*num_items_in_batch, "num_items_in_batch");
  } else if (how == Reduction::kMean) {
    divisor = static_cast<double>(std::max<int64_t>(n_valid, 1));
  }
  auto rows = at::empty({n}, student_logits.options().dtype(acc_type));
  auto grad = compute_grad ? at::empty_like(student_logits) : student_logits.new_empty({0});
  const double scale = (1 - al) * (scale_by_t2 ? t * t : 1.0);
  a.student = student_logits.const_data_ptr();
  a.indices = idx.const_data_ptr<int64_t>();
  a.logprobs = lp.const_data_ptr();
  a.mask = teacher_mask ? mask.const_data_ptr<bool>() : nullptr;
  a.labels = labels ? labels64.const_data_ptr<int64_t>() : nullptr;
  a.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  a.rows = rows.mutable_data_ptr();
  a.n_classes = v;
  a.k = idx.size(1);
  a.s_stride = student_logits.stride(0);
  a.ignore_index = ignore_index;
  a.tail = truncation == "tail";
  a.needs_soft = al < 1;
  a.needs_ce = al > 0;
  a.inv_t = 1 / t;
  a.beta = b;
  a.log_beta = b > 0 ? std::log(b) : -std::numeric_limits<double>::infinity();
  a.log_1m_beta = b < 1 ? std::log1p(-b) : -std::numeric_limits<double>::infinity();
  a.alpha = al;
  a.label_smoothing = scalar_arg(label_smoothing, "label_smoothing");
  a.soft_w = scale;
  a.soft_gw = scale / t;
  a.grad_scale = how == Reduction::kNone || (how == Reduction::kSum && !num_items_in_batch) ? 1.0 : 1.0 / divisor;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(v, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "sparse_kd_loss_cpu", [&] {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { sparse_rows<scalar_t>(a, begin, end); });
  });
  // A NaN row is an undefined softmax or bucket distribution (a check on the rows the kernel wrote).
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_rows", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_VALUE(!std::isnan(r[i]), op, ": a row of student_logits or teacher_logprobs is entirely -inf, or "
                        "holds +inf or NaN, so its softmax is undefined (row ", i, ")");
  });
  if (how == Reduction::kNone) return {rows, grad};
  double total = 0;  // serial, in double: deterministic whatever the thread count
  AT_DISPATCH_FLOATING_TYPES(acc_type, "sparse_kd_loss_sum", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) total += r[i];
  });
  return {at::scalar_tensor(how == Reduction::kSum && !num_items_in_batch ? total : total / divisor, rows.options()),
          grad};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("sparse_kd_loss", &cpu::sparse_kd_loss_cpu); }

}  // namespace lepton_fast
