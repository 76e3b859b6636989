#include "reused_buffers.h"

#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace fused_nce {
namespace {

#if defined(__linux__)
constexpr size_t kHugePage = size_t{2} << 20;

// A gradient's fresh pages, at 4 KiB each, cost more first-touch page faults than the scatter
// itself: ask for transparent huge pages over the whole 2 MiB pages of [data, data + bytes).
void advise_huge_pages(void* data, size_t bytes) {
#if defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t end = begin + bytes;
  const uintptr_t aligned = (begin + kHugePage - 1) & ~(kHugePage - 1);
  if (end > aligned + kHugePage) {
    madvise(reinterpret_cast<void*>(aligned), (end - aligned) & ~(kHugePage - 1), MADV_HUGEPAGE);
  }
#endif
}

// At most this many spare buffers: a training loop that drops its gradient before the next
// backward needs one; one more covers a second parameter or gradient accumulation's extra copy.
constexpr size_t kMaxSpares = 2;

class SpareBuffers {
 public:
  // A mapping of at least `bytes` (a multiple of kHugePage), its size in `*mapped`: the smallest
  // spare one no more than a quarter larger (a row gradient's size varies from step to step with
  // the rows touched), else a fresh one.
  void* take(size_t bytes, size_t* mapped) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = spares_.end();
      for (auto it = spares_.begin(); it != spares_.end(); ++it) {
        if (it->second >= bytes && it->second <= bytes + bytes / 4 &&
            (best == spares_.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != spares_.end()) {
        void* data = best->first;
        *mapped = best->second;
        spares_.erase(best);
        return data;
      }
    }
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) return nullptr;
    advise_huge_pages(data, bytes);
    *mapped = bytes;
    return data;
  }

  void give_back(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (spares_.size() < kMaxSpares) {
        spares_.emplace_back(data, bytes);
        return;
      }
    }
    munmap(data, bytes);
  }

  int64_t release() {
    std::vector<std::pair<void*, size_t>> spares;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      spares.swap(spares_);
    }
    int64_t released = 0;
    for (const auto& [data, bytes] : spares) {
      munmap(data, bytes);
      released += static_cast<int64_t>(bytes);
    }
    return released;
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t total = 0;
    for (const auto& spare : spares_) total += static_cast<int64_t>(spare.second);
    return total;
  }

  // Held across fork() (see spare_buffers).
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> spares_;
};

// Never destroyed: a tensor freed during interpreter shutdown still finds it. The list is locked
// across fork(), so a child (a DataLoader worker) never inherits it locked by another thread.
SpareBuffers& spare_buffers() {
  static auto* buffers = [] {
    auto* made = new SpareBuffers();
    pthread_atfork([] { spare_buffers().lock(); }, [] { spare_buffers().unlock(); },
                   [] { spare_buffers().unlock(); });
    return made;
  }();
  return *buffers;
}

}  // namespace

at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(
                                     c10::typeMetaToScalarType(options.dtype())));
  if (nbytes >= kReusedBufferBytes) {
    const size_t bytes = (static_cast<size_t>(nbytes) + kHugePage - 1) / kHugePage * kHugePage;
    size_t mapped = 0;
    void* data = spare_buffers().take(bytes, &mapped);
    if (data != nullptr) {
      return at::from_blob(
          data, sizes, [mapped](void* p) { spare_buffers().give_back(p, mapped); },
          options.device(at::kCPU));
    }
  }
  auto tensor = at::empty(sizes, options);
  advise_huge_pages(tensor.data_ptr(), static_cast<size_t>(tensor.nbytes()));
  return tensor;
}

int64_t release_reused_buffers() { return spare_buffers().release(); }

int64_t reused_buffer_bytes() { return spare_buffers().bytes(); }

#else  // No mmap: the ordinary allocator, nothing kept.

}  // namespace

at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

int64_t release_reused_buffers() { return 0; }

int64_t reused_buffer_bytes() { return 0; }

#endif

TORCH_LIBRARY_FRAGMENT(fused_nce, m) {
  m.def("release_cpu_buffers() -> int", &release_reused_buffers);
  m.def("cpu_buffer_bytes() -> int", &reused_buffer_bytes);
}

}  // namespace fused_nce
