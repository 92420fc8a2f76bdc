// Shared by the native kernels: 8-float vectors, and running a job on XLA's intra-op pool.

#ifndef DALLE_FLAX_KERNELS_COMMON_H_
#define DALLE_FLAX_KERNELS_COMMON_H_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dalle_flax_kernels {

typedef float v8f __attribute__((vector_size(32)));  // GCC/Clang vector extension (8 floats)

inline v8f Load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Runs `total` work items of `job` on the calling thread and on `helpers` tasks scheduled on
// XLA's intra-op pool. Each calls job->RunAvailable(), which claims items from an atomic counter
// and counts finished ones in job->done. The caller only waits for items that a running thread
// has already claimed, so it cannot deadlock when the pool is busy; the tasks own the job
// jointly, so one that starts after the call returned (it finds nothing left) never touches
// freed memory.
template <typename Job>
void RunOnPool(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t helpers,
               int64_t total) {
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([job] { job->RunAvailable(); });
  }
  job->RunAvailable();
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace dalle_flax_kernels

#endif  // DALLE_FLAX_KERNELS_COMMON_H_
