// CPU kernel of sparse_kd_loss (schema: lepton_fast/ops/sparse_kd_loss.py), the contract of the
// reference kernel; the per-row maths is csrc/sparse_kd_loss.h (shared with the CUDA kernel),
// the buckets lepton_fast.reference.sparse_buckets'. Rows in parallel (at::parallel_for); each
// row in plain scalar loops, the student row read once for its softmax statistics (the
// unlisted columns' at T, all of them at T = 1 for the CE) and once for the gradient. Unlike
// fused_kd_loss's row kernels this one is not vectorised with at::vec nor compiled per ISA.
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

#include "../sparse_kd_loss.h"

namespace lepton_fast {
namespace cpu {
namespace {

struct SparseArgs {
  const void* student;
  const int64_t* indices;
  const void* logprobs;  // in the accumulation dtype
  const bool* mask;      // or nullptr
  const int64_t* labels;  // or nullptr
  void* grad;            // or nullptr
  void* rows;
  int64_t n_classes, k, s_stride;
  bool tail;
  double grad_scale;
  KDParams p;
};

template <typename scalar_t>
void sparse_rows(const SparseArgs& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using Stats = WeightedSoftmaxStats<acc_t>;
  const KDParams& p = a.p;
  const int64_t V = a.n_classes, K = a.k;
  const acc_t inv_t = p.inv_temperature, beta = p.beta, label_smoothing = p.label_smoothing;
  const acc_t log_beta = std::log(beta), log_1m_beta = std::log1p(-beta);
  const bool row_tail = a.tail && p.needs_soft;
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
      if (gr) std::fill(gr, gr + V, scalar_t(0));
      continue;
    }
    const int64_t* idx = a.indices + row * K;
    const acc_t* lpr = static_cast<const acc_t*>(a.logprobs) + row * K;
    const bool* mk = a.mask ? a.mask + row * K : nullptr;
    Stats teacher_t, teacher_1, student, unlisted, ce;
    teacher_t.scale = student.scale = unlisted.scale = inv_t;
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
    // The pass over the row: the softmax statistics at T of the columns not listed ("tail";
    // the listed ones, in increasing order, are skipped) and at T = 1 of all of them (the CE).
    acc_t sum_x = 0;
    if (row_tail || p.needs_ce) {
      if (row_tail) std::sort(listed.begin(), listed.end());
      size_t next = 0;
      for (int64_t j = 0; j < V; ++j) {
        const acc_t x = s[j];
        if (row_tail) {
          if (next < listed.size() && listed[next] == j) {
            ++next;
          } else {
            unlisted.add(x);
          }
        }
        if (p.needs_ce) {
          ce.add(x);
          sum_x += x;
        }
      }
    }
    acc_t row_loss = 0, big_g = 0, g_tail = 0;
    SparseRowConsts<acc_t> c{};
    if (p.needs_soft) {
      c = sparse_row_consts(a.tail, static_cast<int64_t>(listed.size()) == V, inv_t, teacher_t, teacher_1, student,
                            unlisted);
      acc_t d = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (!counted[k]) continue;
        const SparseBucket<acc_t> b = sparse_bucket(p.divergence, c.logp(lp[k]), c.logq(xk[k]), beta, log_beta,
                                                    log_1m_beta);
        d += b.d;
        big_g += g[k] = b.g;
      }
      if (a.tail) {
        const SparseBucket<acc_t> b = sparse_bucket(p.divergence, c.logp_tail, c.logq_tail, beta, log_beta,
                                                    log_1m_beta);
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
    auto ce_grad = [&](int64_t j) {
      return cg * (std::exp(acc_t(s[j]) - lse1) - label_smoothing / V - (j == label ? 1 - label_smoothing : 0));
    };
    for (int64_t j = 0; j < V; ++j) {  // the unlisted columns' formula (the entries' come next)
      acc_t dv = 0;
      if (row_tail) dv = sg * sparse_unlisted_grad(c, acc_t(s[j]), g_tail, big_g);
      if (p.needs_ce) dv += ce_grad(j);
      gr[j] = static_cast<scalar_t>(dv);
    }
    if (p.needs_soft) {
      for (int64_t k = 0; k < K; ++k) {
        if (!counted[k]) continue;
        acc_t dk = (g[k] - std::exp(c.logq(xk[k])) * big_g) * sg;
        if (p.needs_ce) dk += ce_grad(idx[k]);
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
  check_sparse_inputs(student_logits, teacher_indices, teacher_logprobs, teacher_mask, labels, truncation);
  const auto dtype = student_logits.scalar_type();
  const auto acc_type = at::toOpMathType(dtype);
  const int64_t n = student_logits.size(0), v = student_logits.size(1);
  SparseArgs a{};
  a.p = make_kd_params(temperature, beta, alpha, label_smoothing, divergence, ignore_index, scale_by_t2,
                       labels.has_value(), compute_grad);
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
  const Reduction how = parse_reduction(reduction);
  double divisor = 1;
  if (num_items_in_batch) {
    divisor = scalar_arg(*num_items_in_batch, "num_items_in_batch");
  } else if (how == Reduction::kMean) {
    divisor = static_cast<double>(std::max<int64_t>(n_valid, 1));
  }
  auto rows = at::empty({n}, student_logits.options().dtype(acc_type));
  auto grad = compute_grad ? at::empty_like(student_logits) : student_logits.new_empty({0});
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
  a.tail = truncation == "tail";
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
