// CPU kernels of select_pseudo_labels and fused_pseudo_label_loss (math in ../pseudo_labels.h).
// Rows run in parallel. Each row is copied once into float scratch (a few KB, it stays in
// L1/L2), then max, exp-and-sum and the gradient run over the scratch in SIMD: two exps per
// element (weak and strong), each stored and reused by the gradient. float64 runs scalar.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../pseudo_labels.h"
#include "grad_buffer.h"

namespace lepton_fast {
namespace {

// GCC/Clang vector extensions: 8 floats, one AVX register or two SSE ones.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// exp on 8 lanes (Cephes' expf: 2^k * P(r), |r| <= ln2 / 2, ~1 ulp). The callers pass
// x - max <= 0; below -87.3 (and at -inf) it returns 0 exactly, NaN stays NaN.
inline f8 exp8(f8 x) {
  const f8 zero = {};
  const i8 tiny = x < -87.3f;
  const f8 fx = x * 1.44269504088896341f + 0.5f;  // k = floor(fx) rounds x / ln2 to nearest
  i8 k = __builtin_convertvector(fx, i8);  // truncates towards 0; fx <= 0.5, so round down:
  f8 kf = __builtin_convertvector(k, f8);
  const i8 over = kf > fx;
  k += over;  // over is -1 where true
  kf = __builtin_convertvector(k, f8);
  f8 r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
  f8 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const i8 bits = (k + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return tiny ? zero : y;
}

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(f8 v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// The SIMD helpers, cloned for AVX2 and the x86-64 baseline (picked at load time).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LF_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LF_SIMD_CLONES
#endif

LF_SIMD_CLONES float max_of(const float* x, int64_t n) {
  f8 m = f8{} - std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f8 v = load8(x + j);
    m = v > m ? v : m;
  }
  float out = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < kLanes; ++i) out = std::max(out, m[i]);
  for (; j < n; ++j) out = std::max(out, x[j]);
  return out;
}

// x_j <- exp(x_j - shift) when store, and the sum of those exps.
LF_SIMD_CLONES float exp_shift_sum(float* x, int64_t n, float shift, bool store) {
  f8 acc = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f8 e = exp8(load8(x + j) - shift);
    if (store) std::memcpy(x + j, &e, sizeof(e));
    acc += e;
  }
  float sum = hsum(acc);
  for (; j < n; ++j) {
    const float e = std::exp(x[j] - shift);
    if (store) x[j] = e;
    sum += e;
  }
  return sum;
}

// sum_j target_term(q_j, s_j), q given unnormalised as e_j (the factor comes out of the sum).
LF_SIMD_CLONES float target_dot(const float* e, const float* s, int64_t n) {
  const f8 zero = {};
  f8 acc = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f8 q = load8(e + j);
    acc += q == zero ? zero : q * load8(s + j);
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += target_term(e[j], s[j]);
  return sum;
}

// The first index holding m (the row's max): the lowest on ties, as torch.argmax; 0 if none
// (an all -inf or NaN row, reported through its NaN confidence).
LF_SIMD_CLONES int64_t first_index_of(const float* x, int64_t n, float m) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const i8 hit = load8(x + j) == m;
    bool any = false;
    for (int i = 0; i < kLanes; ++i) any |= hit[i] != 0;
    if (any) break;
  }
  for (; j < n; ++j) {
    if (x[j] == m) return j;
  }
  return 0;
}

int64_t first_index_of(const double* x, int64_t n, double m) {
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] == m) return j;
  }
  return 0;
}

double max_of(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

double exp_shift_sum(double* x, int64_t n, double shift, bool store) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(x[j] - shift);
    if (store) x[j] = e;
    sum += e;
  }
  return sum;
}

double target_dot(const double* e, const double* s, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += target_term(e[j], s[j]);
  return sum;
}

// The weak row's pseudo-label. z holds w / T on entry and, when keep_exp, exp(z - max) after.
template <typename acc_t>
struct WeakRow {
  int64_t label;
  acc_t confidence;
  acc_t sum;
};

template <typename acc_t>
WeakRow<acc_t> weak_row(acc_t* z, int64_t n, bool keep_exp) {
  const acc_t m = max_of(z, n);
  const int64_t label = first_index_of(z, n, m);
  const acc_t sum = exp_shift_sum(z, n, m, keep_exp);
  return {label, confidence_from_sum(m, sum), sum};
}

template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* x, acc_t* out, int64_t n, acc_t scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = acc_t(x[j]) * scale;
}

// A row whose softmax is undefined (entirely -inf, or NaN in it) came out NaN.
template <typename acc_t>
void check_rows_defined(const acc_t* values, int64_t n_rows, const char* op, const char* name) {
  for (int64_t row = 0; row < n_rows; ++row) {
    TORCH_CHECK_VALUE(!std::isnan(values[row]), op, ": row ", row, " of ", name,
                      " is entirely -inf, or holds +inf or NaN, so its softmax is undefined");
  }
}

// Rows are independent; aim for a few hundred KB of input per task.
int64_t grain(int64_t n_classes) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n_classes, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_pseudo_labels_cpu(
    const at::Tensor& logits, const at::Tensor& threshold, const at::Tensor& temperature,
    const std::optional<at::Tensor>& class_thresholds) {
  LF_CHECK_ROWS(logits);
  const auto p = make_pseudo_label_params(threshold, temperature, false, false);
  const int64_t n_rows = logits.size(0), n_classes = logits.size(1);
  at::Tensor thresholds;
  if (class_thresholds) {
    LF_CHECK_SHAPE(*class_thresholds, n_classes);
    thresholds = class_thresholds->to(at::kFloat).contiguous();
  }
  auto acc_type = at::toOpMathType(logits.scalar_type());
  auto labels = at::empty({n_rows}, logits.options().dtype(at::kLong));
  auto confidence = at::empty({n_rows}, logits.options().dtype(acc_type));
  auto mask = at::empty({n_rows}, logits.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "select_pseudo_labels_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* x = logits.const_data_ptr<scalar_t>();
    const float* ct = class_thresholds ? thresholds.const_data_ptr<float>() : nullptr;
    auto* y = labels.data_ptr<int64_t>();
    auto* c = confidence.data_ptr<acc_t>();
    auto* m = mask.data_ptr<bool>();
    at::parallel_for(0, n_rows, grain(n_classes), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(n_classes);
      for (int64_t row = begin; row < end; ++row) {
        load_row(x + row * logits.stride(0), z.data(), n_classes, acc_t(p.inv_temperature));
        const auto weak = weak_row(z.data(), n_classes, false);
        bool selected;
        row_weight<acc_t>(weak.confidence, weak.label, ct, nullptr, row, p.threshold, &selected);
        y[row] = weak.label;
        c[row] = weak.confidence;
        m[row] = selected;
      }
    });
    check_rows_defined(c, n_rows, "select_pseudo_labels", "logits");
  });
  return {labels, confidence, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_pseudo_label_loss_cpu(
    const at::Tensor& strong, const at::Tensor& weak, const at::Tensor& threshold, const at::Tensor& temperature,
    bool soft, const std::optional<at::Tensor>& class_thresholds, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool compute_grad) {
  check_views(strong, weak);
  const auto p = make_pseudo_label_params(threshold, temperature, soft, compute_grad);
  const Reduction how = parse_reduction(reduction);
  const int64_t n_rows = strong.size(0), n_classes = strong.size(1);
  const auto acc_type = at::toOpMathType(strong.scalar_type());
  // "mean" averages over ALL rows (FixMatch), so its 1/N folds into the gradient.
  const double grad_scale = how == Reduction::kMean ? 1.0 / std::max<int64_t>(n_rows, 1) : 1.0;
  at::Tensor thresholds, row_weights;
  if (class_thresholds) {
    LF_CHECK_SHAPE(*class_thresholds, n_classes);
    thresholds = class_thresholds->to(at::kFloat).contiguous();
  }
  if (weights) {
    LF_CHECK_SHAPE(*weights, n_rows);
    row_weights = weights->to(acc_type).contiguous();
  }
  auto rows = at::empty({n_rows}, strong.options().dtype(acc_type));
  auto grad = compute_grad ? cpu::GradientBlockCache::get().empty_like(strong) : at::empty({0}, strong.options());
  auto labels = at::empty({n_rows}, strong.options().dtype(at::kLong));
  auto confidence = at::empty({n_rows}, strong.options().dtype(acc_type));
  auto mask = at::empty({n_rows}, strong.options().dtype(at::kBool));
  auto counts = at::zeros({n_classes}, strong.options().dtype(at::kLong));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, strong.scalar_type(), "fused_pseudo_label_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* s_ptr = strong.const_data_ptr<scalar_t>();
    const auto* w_ptr = weak.const_data_ptr<scalar_t>();
    const float* ct = class_thresholds ? thresholds.const_data_ptr<float>() : nullptr;
    const acc_t* wt = weights ? row_weights.const_data_ptr<acc_t>() : nullptr;
    auto* g_ptr = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    auto* loss_rows = rows.data_ptr<acc_t>();
    auto* y = labels.data_ptr<int64_t>();
    auto* c = confidence.data_ptr<acc_t>();
    auto* m = mask.data_ptr<bool>();
    at::parallel_for(0, n_rows, grain(n_classes), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * n_classes);
      acc_t* z = scratch.data();  // weak / T, then exp(z - max z)
      acc_t* e = z + n_classes;  // strong, then exp(s - max s)
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* s = s_ptr + row * strong.stride(0);
        scalar_t* g = compute_grad ? g_ptr + row * n_classes : nullptr;
        load_row(w_ptr + row * weak.stride(0), z, n_classes, acc_t(p.inv_temperature));
        const auto wr = weak_row(z, n_classes, p.soft);
        bool selected;
        const acc_t weight = row_weight(wr.confidence, wr.label, ct, wt, row, p.threshold, &selected);
        y[row] = wr.label;
        c[row] = wr.confidence;
        m[row] = selected;
        if (weight == acc_t(0)) {
          loss_rows[row] = 0;
          if (g) std::fill(g, g + n_classes, scalar_t(0));
          continue;
        }
        load_row(s, e, n_classes, acc_t(1));
        const acc_t s_max = max_of(e, n_classes);
        // Soft: sum_j q_j s_j needs s before e is overwritten; q_j = z_j / sum.
        const acc_t dot = p.soft ? target_dot(z, e, n_classes) / wr.sum : acc_t(s[wr.label]);
        const acc_t s_sum = exp_shift_sum(e, n_classes, s_max, true);
        const acc_t lse = s_max + std::log(s_sum);
        loss_rows[row] = weight * pseudo_label_ce(lse, dot);
        if (!g) continue;
        const acc_t gw = weight * acc_t(grad_scale), inv_s = acc_t(1) / s_sum, inv_w = acc_t(1) / wr.sum;
        if (p.soft) {
          for (int64_t j = 0; j < n_classes; ++j) g[j] = scalar_t(pseudo_label_grad(e[j] * inv_s, z[j] * inv_w, gw));
        } else {
          for (int64_t j = 0; j < n_classes; ++j) g[j] = scalar_t(pseudo_label_grad(e[j] * inv_s, acc_t(0), gw));
          g[wr.label] = scalar_t(pseudo_label_grad(e[wr.label] * inv_s, acc_t(1), gw));
        }
      }
    });
    check_rows_defined(c, n_rows, "fused_pseudo_label_loss", "weak_logits");
    check_rows_defined(loss_rows, n_rows, "fused_pseudo_label_loss", "strong_logits");
    auto* n_selected = counts.data_ptr<int64_t>();
    double total = 0;
    for (int64_t row = 0; row < n_rows; ++row) {
      n_selected[y[row]] += m[row];
      total += loss_rows[row];
    }
    loss = how == Reduction::kNone ? rows
                                   : at::scalar_tensor(how == Reduction::kMean ? total * grad_scale : total,
                                                       rows.options());
  });
  return {loss, grad, labels, confidence, mask, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(lepton_fast, CPU, m) {
  m.impl("select_pseudo_labels", &select_pseudo_labels_cpu);
  m.impl("fused_pseudo_label_loss", &fused_pseudo_label_loss_cpu);
}

}  // namespace lepton_fast
