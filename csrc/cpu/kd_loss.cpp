// CPU kernel of kd_loss_forward: rows in parallel, float32 (float64 for double) accumulation.
// Pass 1 gathers the softmax statistics of both rows, pass 2 the row sums of the loss,
// pass 3 writes the gradient; a row of C <= 64k floats stays in L2 between passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kd_loss.h"

namespace lepton_fast {
namespace {

template <typename scalar_t>
void kd_rows(const scalar_t* student, const scalar_t* teacher, const int64_t* labels, scalar_t* grad,
             at::opmath_type<scalar_t>* loss, int64_t row_begin, int64_t row_end, int64_t n_classes, int64_t s_stride,
             int64_t t_stride, const KDParams& p, float grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = p.inv_temperature;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t log_beta = std::log(acc_t(p.beta)), log_1m_beta = std::log1p(-acc_t(p.beta));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* s = student + row * s_stride;
    const scalar_t* t = teacher + row * t_stride;
    scalar_t* g = p.compute_grad ? grad + row * n_classes : nullptr;
    const int64_t label = p.has_labels ? labels[row] : -1;
    if (p.has_labels && label == p.ignore_index) {
      loss[row] = 0;
      if (g) std::fill(g, g + n_classes, scalar_t(0));
      continue;
    }
    // Pass 1: softmax statistics at temperature T (and at T = 1 for the CE term).
    SoftmaxStats<acc_t> st_s, st_t, st_1;
    for (int64_t j = 0; j < n_classes; ++j) {
      st_s.add(acc_t(s[j]) * inv_t);
      st_t.add(acc_t(t[j]) * inv_t);
      if (p.needs_ce) st_1.add(acc_t(s[j]));
    }
    const acc_t lse_s = st_s.lse(), lse_t = st_t.lse(), lse_1 = st_1.lse();
    // Pass 2: the divergence D and, for reverse KL / JSD, the row constant of its gradient.
    acc_t div = 0, k_s = 0, sum_logits = 0;
    for (int64_t j = 0; j < n_classes; ++j) {
      const acc_t lps = acc_t(s[j]) * inv_t - lse_s, lpt = acc_t(t[j]) * inv_t - lse_t;
      if (p.needs_soft) {
        switch (p.divergence) {
          case Divergence::kForwardKL: div += kl_term(lpt, lps); break;
          case Divergence::kReverseKL: div += kl_term(lps, lpt); break;
          case Divergence::kJSD: {
            const acc_t lm = log_mixture(lps, lpt, log_beta, log_1m_beta);
            const acc_t ks = kl_term(lps, lm);
            k_s += ks;
            div += acc_t(p.beta) * kl_term(lpt, lm) + (1 - acc_t(p.beta)) * ks;
            break;
          }
        }
      }
      if (p.needs_ce) sum_logits += acc_t(s[j]);
    }
    if (p.divergence == Divergence::kReverseKL) k_s = div;
    acc_t row_loss = p.needs_soft ? acc_t(p.soft_weight) * div : acc_t(0);
    const acc_t eps = p.label_smoothing, smooth = eps / acc_t(n_classes);
    if (p.needs_ce) {
      const acc_t ce = lse_1 - (1 - eps) * acc_t(s[label]) - smooth * sum_logits;
      row_loss += acc_t(p.alpha) * ce;
    }
    loss[row] = row_loss;
    if (!g) continue;
    // Pass 3: the gradient, already multiplied by grad_scale.
    const acc_t gs = grad_scale, soft_w = acc_t(p.soft_grad_weight) * gs, ce_w = acc_t(p.alpha) * gs;
    for (int64_t j = 0; j < n_classes; ++j) {
      acc_t d = 0;
      if (p.needs_soft) {
        const acc_t lps = acc_t(s[j]) * inv_t - lse_s, lpt = acc_t(t[j]) * inv_t - lse_t;
        const acc_t ps = std::exp(lps);
        switch (p.divergence) {
          case Divergence::kForwardKL: d = ps - std::exp(lpt); break;
          case Divergence::kReverseKL: d = ps == 0 ? acc_t(0) : ps * (lps - lpt - k_s); break;
          case Divergence::kJSD:
            d = ps == 0 ? acc_t(0)
                        : (1 - acc_t(p.beta)) * ps * (lps - log_mixture(lps, lpt, log_beta, log_1m_beta) - k_s);
            break;
        }
        d *= soft_w;
      }
      if (p.needs_ce) {
        const acc_t q = std::exp(acc_t(s[j]) - lse_1);
        d += ce_w * (q - smooth - (j == label ? 1 - eps : acc_t(0)));
      }
      g[j] = static_cast<scalar_t>(d);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, double temperature, c10::string_view divergence, double beta,
    double alpha, double label_smoothing, int64_t ignore_index, bool scale_by_t2, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "kd_loss_forward: student and teacher must be [N, C] of the same shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "kd_loss_forward: dtypes differ");
  TORCH_CHECK(student.stride(1) == 1 && teacher.stride(1) == 1,
              "kd_loss_forward: rows must be contiguous along C");
  const KDParams p = make_kd_params(temperature, divergence, beta, alpha, label_smoothing, ignore_index,
                                    scale_by_t2, labels.has_value(), compute_grad);
  const int64_t n_rows = student.size(0), n_classes = student.size(1);
  at::Tensor labels64;
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n_rows, "kd_loss_forward: labels must be [N]");
    labels64 = labels->to(at::kLong).contiguous();
  }
  // float32 losses, float64 for float64 logits (gradcheck).
  auto loss = at::empty({n_rows}, student.options().dtype(at::toOpMathType(student.scalar_type())));
  auto grad = compute_grad ? at::empty({n_rows, n_classes}, student.options()) : at::empty({0}, student.options());
  const float gs = grad_scale.item<float>();
  // Rows are independent; aim for a few hundred KB of input per task.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n_classes, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_forward_cpu", [&] {
    const auto* s = student.data_ptr<scalar_t>();
    const auto* t = teacher.data_ptr<scalar_t>();
    const int64_t* y = labels ? labels64.data_ptr<int64_t>() : nullptr;
    auto* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    auto* l = loss.data_ptr<at::opmath_type<scalar_t>>();
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      kd_rows<scalar_t>(s, t, y, g, l, begin, end, n_classes, student.stride(0), teacher.stride(0), p, gs);
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) { m.impl("kd_loss_forward", &kd_loss_forward_cpu); }

}  // namespace lepton_fast
