// The gradient buffer of the fused losses on the CPU.
//
// The losses write d(loss)/d(logits) during the forward into a buffer as large as the
// logits. A fresh allocation of that size comes from the operating system (glibc serves it
// with mmap and unmaps it on free), so every call faults in every page again: on the 2-core
// benchmark VM the first touch of 256 MiB cost 90-350 ms, more than the kernel itself
// (benchmarks/RESULTS.md). In a training loop the previous step's gradient is dead by the
// next forward (autograd handed it to the layer below and dropped it), so its memory can
// serve the next step: a freed buffer goes back to a one-block cache instead of the
// operating system, and the next request of a similar size takes it, already faulted in.
// The cache holds no reference to any tensor, so a gradient that someone keeps (as the
// `.grad` of a leaf, say) stays theirs; a new block is allocated then.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lepton_fast {
namespace cpu {

// Whether the fused losses write a gradient with non-temporal stores (RowIO::store_streaming,
// which saves reading each line in before it is overwritten and evicts nothing): for a
// gradient too large to still be in cache when its reader (the layer below, in the backward)
// gets to it. At 16 MB (fused_pseudo_label_loss 4096 x 1000 float32) streaming was no faster
// on the 2-core VM, at 256 MB (fused_kd_loss 2048 x 32000) it saved ~10 % (benchmarks/RESULTS.md).
constexpr int64_t kStreamGradBytes = int64_t(32) << 20;
inline bool stream_gradient(const at::Tensor& grad) {
  return static_cast<int64_t>(grad.nbytes()) >= kStreamGradBytes;
}

class GradientBlockCache {
 public:
  // Below this size the allocator's own free lists already serve a buffer without faults.
  static constexpr size_t kMinBytes = size_t(1) << 20;

  static GradientBlockCache& get() {
    static GradientBlockCache* cache = new GradientBlockCache();  // outlives every tensor
    return *cache;
  }

  // An uninitialised tensor like `logits` (contiguous) whose memory may be recycled.
  at::Tensor empty_like(const at::Tensor& logits) {
    const size_t bytes = static_cast<size_t>(logits.numel()) * logits.element_size();
    if (bytes < kMinBytes) return at::empty(logits.sizes(), logits.options());
    void* ptr = take(bytes);
    if (ptr == nullptr) {
      ptr = c10::alloc_cpu(bytes);
      advise_huge_pages(ptr, bytes);
    }
    auto out = at::from_blob(ptr, logits.sizes(), [bytes](void* p) { GradientBlockCache::get().give_back(p, bytes); },
                             logits.options());
    // As torch.empty does under torch.use_deterministic_algorithms (the tests turn it on): a
    // NaN-filled block, so that an element the kernel does not write shows.
    const auto& ctx = at::globalContext();
    if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory()) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return out;
  }

 private:
  // The cached block if it fits (and wastes at most half of itself), else nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (block_ == nullptr || block_bytes_ < bytes || block_bytes_ / 2 > bytes) return nullptr;
    void* ptr = block_;
    block_ = nullptr;
    block_bytes_ = 0;
    return ptr;
  }

  // Keeps the most recently freed block; the one it replaces goes back to the system.
  void give_back(void* ptr, size_t bytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted = block_;
      block_ = ptr;
      block_bytes_ = bytes;
    }
    if (evicted != nullptr) c10::free_cpu(evicted);
  }

  // Transparent huge pages (Linux, THP in "madvise" mode) cut the faults of a first touch
  // 512-fold; advisory only, a no-op where THP is off.
  static void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)ptr;
    (void)bytes;
#endif
  }

  std::mutex mutex_;
  void* block_ = nullptr;
  size_t block_bytes_ = 0;
};

}  // namespace cpu
}  // namespace lepton_fast
