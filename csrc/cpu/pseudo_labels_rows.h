// The row kernel of select_pseudo_labels and fused_pseudo_label_loss, vectorised with
// at::vec. Each isa_<isa>.cpp includes it once (through isa_kernels.h), after choosing the
// instruction set and CPU_CAPABILITY; the code below is in an anonymous namespace, so the
// copies never meet at link time.
//
// One row (csrc/pseudo_labels.h has the formulas), each view walked in chunks of kChunk
// elements as fused_kd_loss does: the chunk's max first (loads from memory, no exp), then
// one rescale per chunk and one exp per element, lane by lane.
//   weak pass: lane-wise softmax statistics of z = w / T, and for each lane the chunk where
//     its max last rose. The arg-max is the first w equal to the row's max (the max of w /T
//     is max(w) / T: T > 0 keeps the order), found by re-reading from the earliest such
//     chunk of a lane that holds it (usually within that one chunk). Soft: the exps are
//     kept in scratch for the target q.
//   A row of weight 0 stops here: loss 0, gradient 0, its strong view never read.
//   strong pass: the same statistics of s (and, soft, sum_j q_j s_j); the exps are kept in
//     scratch with each chunk's lane maxima, so that the gradient pass rescales them (one
//     exp per chunk) instead of taking a second exp per element.
//   gradient pass: weight * grad_scale * (p - q), or (p - onehot(y)), from scratch only.
// Every element of each view is thus read from memory once and exponentiated once: the
// floors of benchmarks/RESULTS.md. exp is at::vec's exp_u20 (relative error ~1e-6 in
// float32, inside the 1e-5 tolerance); float64 uses the accurate exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

#include "pseudo_labels_cpu.h"
#include "row_io.h"

namespace lepton_fast {
namespace cpu {
namespace {

template <typename scalar_t>
struct PseudoLabelKernel {
  using IO = RowIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using M = VecMath<acc_t>;
  static constexpr int64_t W = IO::W;
  // A chunk is read from memory once (its max) and once more from L1 (its exps): 4 KB of
  // float32 with AVX-512, so that a row of 1000 classes is one chunk, with one rescale.
  static constexpr int64_t kChunk = 64 * W;
  static constexpr acc_t kLowest = std::numeric_limits<acc_t>::lowest();
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // f(j, x[j:j+W]) for each vector in [j0, j1): whole vectors, then the tail padded with -inf
  // (which adds exp(-inf) = 0 to every sum).
  template <typename F>
  static void for_each_vector(const scalar_t* x, int64_t j0, int64_t j1, F&& f) {
    int64_t j = j0;
    for (; j + W <= j1; j += W) f(j, IO::load(x + j, W, kNegInf));
    if (j < j1) f(j, IO::load(x + j, j1 - j, kNegInf));
  }

  // Lane-wise statistics of one view z = x * scale (scale = 1 / T > 0): the max of x (kept
  // finite, from the lowest value, so that `x - max` is never -inf - -inf) and the sum of
  // exp((x - max) * scale): the max is subtracted before the scaling (csrc/common.h, log_sum).
  struct Lanes {
    Vec max, sum;
  };

  // One view's pass, chunk by chunk. On each chunk, `on_chunk(k, max, rose)` sees the new
  // lane maxima and the lanes where the max rose; `on_exp(j, x, e)` each vector of values
  // and of their exps exp((x - max) * scale).
  template <typename OnChunk, typename OnExp>
  static Lanes sweep(const scalar_t* x, int64_t n, acc_t scale, OnChunk&& on_chunk, OnExp&& on_exp) {
    const Vec v_scale(scale);
    // Plain locals, not a Lanes: GCC kept a struct's sum in memory, stored every iteration.
    Vec max(kLowest), sum(0);
    for (int64_t j0 = 0, k = 0; j0 < n; j0 += kChunk, ++k) {
      const int64_t j1 = std::min(n, j0 + kChunk);
      Vec cm = max;
      for_each_vector(x, j0, j1, [&](int64_t j, const Vec& v) {
        prefetch_ahead(x + j);
        cm = M::running_max(cm, v);
      });
      sum = sum * M::exp((max - cm) * v_scale);
      on_chunk(k, cm, cm > max);
      max = cm;
      for_each_vector(x, j0, j1, [&](int64_t j, const Vec& v) {
        const Vec e = M::exp((v - max) * v_scale);
        sum = sum + e;
        on_exp(j, v, e);
      });
    }
    return Lanes{max, sum};
  }

  // The row's max of x (NaN if a lane saw one) and sum of exp((x - max) * scale), from the
  // lanes. Lanes by value, here and in arg_max, for the reason RowIO::merge gives.
  static void merge(Lanes st, acc_t scale, acc_t& max, acc_t& sum) {
    max = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return M::max(a, b); }, st.max);
    sum = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; },
                                         st.sum * M::exp((st.max - Vec(max)) * Vec(scale)));
  }

  // The first index j >= from with x_j == max, or -1.
  static int64_t first_index_of(const scalar_t* x, int64_t n, int64_t from, acc_t max) {
    const Vec target(max);
    int64_t found = -1;
    for_each_vector(x, from, n, [&](int64_t j, const Vec& v) {
      // zero_mask: a bit per lane where (x != max) is all zeros, i.e. where x == max.
      const int hits = (v != target).zero_mask();
      if (found < 0 && hits != 0) found = j + __builtin_ctz(static_cast<unsigned>(hits));
    });
    return found;
  }

  // The arg-max of x (the first index on ties, as torch.argmax), or 0 for a row without a
  // maximum (entirely -inf, or NaN: reported through its confidence). The row's first
  // maximum lies in the earliest chunk where a lane that holds it rose, so only the chunks
  // from there on are read again (all of them only if no lane ever rose: a row of lowest
  // finite values).
  static int64_t arg_max(const scalar_t* x, int64_t n, Lanes st, Vec rose_in) {
    alignas(64) acc_t lane_max[W], lane_chunk[W];
    st.max.store(lane_max);
    rose_in.store(lane_chunk);
    acc_t max = kLowest;
    for (int64_t i = 0; i < W; ++i) max = std::max(max, lane_max[i]);
    acc_t first_chunk = std::numeric_limits<acc_t>::max();
    for (int64_t i = 0; i < W; ++i) {
      if (lane_max[i] == max) first_chunk = std::min(first_chunk, lane_chunk[i]);
    }
    if (first_chunk == std::numeric_limits<acc_t>::max()) return 0;
    return std::max<int64_t>(0, first_index_of(x, n, static_cast<int64_t>(first_chunk) * kChunk, max));
  }

  // Scratch (one allocation per task, never per row): the weak exps (soft) and the strong
  // exps (gradient), each view's lane maxima per chunk.
  template <bool kLoss, bool kSoft, bool kGrad>
  static void rows(const PseudoLabelRows& a, int64_t begin, int64_t end) {
    const PseudoLabelParams& p = a.p;
    const int64_t C = a.n_classes;
    const int64_t padded = (C + W - 1) / W * W, n_chunks = (C + kChunk - 1) / kChunk;
    const int64_t weak_size = kSoft ? padded + n_chunks * W : 0, strong_size = kGrad ? padded + n_chunks * W : 0;
    std::vector<acc_t> scratch(weak_size + strong_size);
    acc_t* weak_exps = scratch.data();
    acc_t* weak_maxima = weak_exps + padded;
    acc_t* strong_exps = scratch.data() + weak_size;
    acc_t* strong_maxima = strong_exps + padded;

    const acc_t inv_t = p.inv_temperature, threshold = p.threshold, grad_scale = p.grad_scale;
    const auto* class_thresholds = static_cast<const acc_t*>(a.class_thresholds);
    const auto* weights = static_cast<const acc_t*>(a.weights);
    auto* confidence = static_cast<acc_t*>(a.confidence);
    auto* loss = static_cast<acc_t*>(a.loss);

    for (int64_t row = begin; row < end; ++row) {
      const auto* w = static_cast<const scalar_t*>(a.weak) + row * a.weak_stride;
      // Weak pass. rose_in: per lane, the last chunk where the lane's max rose.
      Vec rose_in(0);
      const Lanes weak = sweep(
          w, C, inv_t,
          [&](int64_t k, const Vec& max, const Vec& rose) {
            rose_in = Vec::blendv(rose_in, Vec(acc_t(k)), rose);
            if constexpr (kSoft) max.store(weak_maxima + k * W);
          },
          [&](int64_t j, const Vec&, const Vec& e) {
            if constexpr (kSoft) e.store(weak_exps + j);
          });
      acc_t w_max, w_sum;
      merge(weak, inv_t, w_max, w_sum);
      const int64_t label = arg_max(w, C, weak, rose_in);
      const acc_t conf = confidence_from_sum(w_max, w_sum);
      bool selected;
      const acc_t weight = row_weight(conf, label, class_thresholds, weights, row, threshold, &selected);
      a.labels[row] = label;
      confidence[row] = conf;
      a.mask[row] = selected;
      if constexpr (!kLoss) continue;

      scalar_t* g = kGrad ? static_cast<scalar_t*>(a.grad) + row * C : nullptr;
      if (weight == acc_t(0)) {
        loss[row] = 0;
        if constexpr (kGrad) {
          for (int64_t j = 0; j < C; j += W) IO::store(g + j, Vec(0), std::min(W, C - j), a.stream_grad);
        }
        continue;
      }

      // Strong pass; soft: sum_j q_j s_j, q_j = weak exp * exp((chunk's lane max - max) / T) / sum.
      const auto* s = static_cast<const scalar_t*>(a.strong) + row * a.strong_stride;
      const Vec v_w_max(w_max), v_inv_w_sum(acc_t(1) / w_sum), v_inv_t(inv_t);
      Vec target_dot(0), q_scale(0);
      const Lanes strong = sweep(
          s, C, acc_t(1),
          [&](int64_t k, const Vec& max, const Vec&) {
            if constexpr (kGrad) max.store(strong_maxima + k * W);
            if constexpr (kSoft) q_scale = M::exp((Vec::loadu(weak_maxima + k * W) - v_w_max) * v_inv_t) * v_inv_w_sum;
          },
          [&](int64_t j, const Vec& x, const Vec& e) {
            if constexpr (kGrad) e.store(strong_exps + j);
            if constexpr (kSoft) {
              const Vec q = Vec::loadu(weak_exps + j) * q_scale;
              target_dot = target_dot + M::zero_where_zero(q, q * x);  // target_term
            }
          });
      acc_t s_max, s_sum;
      merge(strong, acc_t(1), s_max, s_sum);
      const acc_t lse = lse_from_sum(s_max, s_sum);
      const acc_t dot = kSoft ? IO::sum(target_dot) : acc_t(s[label]);
      loss[row] = weight * (lse - dot);
      if constexpr (!kGrad) continue;

      // Gradient pass, from scratch: gw (p - target), p = strong exp * exp(chunk's lane max - lse).
      const Vec v_lse(lse), v_gw(weight * grad_scale);
      for (int64_t j0 = 0, k = 0; j0 < C; j0 += kChunk, ++k) {
        const int64_t j1 = std::min(C, j0 + kChunk);
        const Vec p_scale = M::exp(Vec::loadu(strong_maxima + k * W) - v_lse) * v_gw;
        Vec q_scale_gw(0);
        if constexpr (kSoft) {
          q_scale_gw = M::exp((Vec::loadu(weak_maxima + k * W) - v_w_max) * v_inv_t) * v_inv_w_sum * v_gw;
        }
        for (int64_t j = j0; j < j1; j += W) {
          Vec d = Vec::loadu(strong_exps + j) * p_scale;
          if constexpr (kSoft) d = d - Vec::loadu(weak_exps + j) * q_scale_gw;
          IO::store(g + j, d, std::min(W, j1 - j), a.stream_grad);
        }
      }
      // The one-hot term, with the accurate exp: p_y - 1 cancels where p_y is near 1.
      if constexpr (!kSoft) {
        g[label] = static_cast<scalar_t>(weight * grad_scale * (std::exp(acc_t(s[label]) - lse) - acc_t(1)));
      }
    }
    if (a.stream_grad) streaming_fence();
  }
};

template <typename scalar_t>
void pseudo_label_rows_any_kind(const PseudoLabelRows& a, int64_t begin, int64_t end) {
  using K = PseudoLabelKernel<scalar_t>;
  if (a.strong == nullptr) return K::template rows<false, false, false>(a, begin, end);
  BOOL_SWITCH(a.p.soft, kSoft, [&] {
    BOOL_SWITCH(a.p.compute_grad, kGrad, [&] { K::template rows<true, kSoft, kGrad>(a, begin, end); });
  });
}

inline void pseudo_label_rows_any_dtype(const PseudoLabelRows& a, int64_t begin, int64_t end) {
  with_row_dtype(a.dtype, [&](auto tag) { pseudo_label_rows_any_kind<decltype(tag)>(a, begin, end); });
}

}  // namespace
}  // namespace cpu
}  // namespace lepton_fast
