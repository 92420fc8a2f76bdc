// Small-batch float32 matmul for XLA:CPU, called through the XLA FFI (jax.ffi.ffi_call).
//
// y[M, N] = x[M, K] @ w[K, N] with 1 <= M <= kMaxRows (row-major). This is the shape of every
// Dense layer in a decode step: a handful of rows (images x2 with guidance) against a large
// weight matrix. XLA:CPU sends M >= 2 to Eigen's GEMM, which packs the weights before the
// multiply and reaches about half of the machine's read bandwidth at M = 2. Here each weight
// row is loaded once and multiplied into all M rows while it sits in registers, and the rows
// of w are streamed in order, so the kernel runs at close to memory bandwidth.
//
// Parallelism: K is cut into a fixed number of chunks (independent of the thread count, so
// results are bitwise reproducible); each chunk writes its own partial sum and the partials are
// added in chunk order. Chunks are claimed by the calling thread and by tasks on XLA's intra-op
// thread pool (RunOnPool in common.h).
//
// Built on first use by dalle_flax.kernels (compiled for the host CPU, cached).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 64;
constexpr int64_t kMaxChunks = 8;
constexpr int64_t kMinChunkRows = 64;

using dalle_flax_kernels::Load8;
using dalle_flax_kernels::Store8;
using dalle_flax_kernels::v8f;

// acc[m, :] += sum over j < G of x[m, k + j] * w[k + j, :] for M rows (x row stride K, acc
// row stride N): G weight rows are loaded once per 8 columns and used for all M rows.
template <int M, int G>
void RowGroup(const float* x, int64_t K, const float* w, int64_t N, float* acc) {
  v8f a[M][G];
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < G; ++j) a[m][j] = v8f{} + x[m * K + j];
  }
  const int64_t n8 = N & ~int64_t{7};
  for (int64_t n = 0; n < n8; n += 8) {
    v8f v[G];
    for (int j = 0; j < G; ++j) v[j] = Load8(w + j * N + n);
    for (int m = 0; m < M; ++m) {
      v8f s = Load8(acc + m * N + n);
      for (int j = 0; j < G; ++j) s += a[m][j] * v[j];
      Store8(acc + m * N + n, s);
    }
  }
  for (int64_t n = n8; n < N; ++n) {
    for (int m = 0; m < M; ++m) {
      float s = acc[m * N + n];
      for (int j = 0; j < G; ++j) s += x[m * K + j] * w[j * N + n];
      acc[m * N + n] = s;
    }
  }
}

using GroupFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

template <int G, int... Ms>
GroupFn PickGroupFn(int64_t rows, std::integer_sequence<int, Ms...>) {
  static constexpr GroupFn fns[] = {&RowGroup<Ms + 1, G>...};
  return fns[rows - 1];
}

constexpr int kRowBlock = 8;  // rows of x per register block (more would spill)

// acc[rows, N] = x[:, k0:k1] @ w[k0:k1, :]: weight rows in groups (16 for 1-2 rows of x, whose
// broadcasts then still fit in registers; else 8), x rows in blocks of kRowBlock; a group of
// weight rows stays in L1 while the row blocks reuse it.
void ChunkProduct(const float* x, const float* w, float* acc, int64_t rows, int64_t K, int64_t N,
                  int64_t k0, int64_t k1) {
  std::memset(acc, 0, sizeof(float) * rows * N);
  const auto seq = std::make_integer_sequence<int, kRowBlock>{};
  const int64_t group = rows <= 2 ? 16 : 8;
  for (int64_t k = k0; k < k1;) {
    const int64_t step = k + group <= k1 ? group : 1;
    for (int64_t r = 0; r < rows; r += kRowBlock) {
      const int64_t block = std::min<int64_t>(kRowBlock, rows - r);
      const GroupFn fn = step == 16  ? PickGroupFn<16>(block, seq)
                         : step == 8 ? PickGroupFn<8>(block, seq)
                                     : PickGroupFn<1>(block, seq);
      fn(x + r * K + k, K, w + k * N, N, acc + r * N);
    }
    k += step;
  }
}

// Work shared by the caller and the pool tasks (see RunOnPool).
struct Job {
  const float* x;
  const float* w;
  int64_t K, N, rows, chunks, chunk_rows;
  std::unique_ptr<float[]> partials;  // chunks x rows x N
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void RunAvailable() {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t k0 = c * chunk_rows, k1 = std::min(K, k0 + chunk_rows);
      ChunkProduct(x, w, partials.get() + c * rows * N, rows, K, N, k0, k1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("dalle_flax_small_matmul expects rank-2 x, w and y");
  }
  const int64_t rows = xd[0], K = xd[1], N = wd[1];
  if (wd[0] != K || yd[0] != rows || yd[1] != N) {
    return ffi::Error::InvalidArgument(
        "dalle_flax_small_matmul: shapes do not chain: x (" + std::to_string(rows) + ", " +
        std::to_string(K) + "), w (" + std::to_string(wd[0]) + ", " + std::to_string(N) +
        "), y (" + std::to_string(yd[0]) + ", " + std::to_string(yd[1]) + ")");
  }
  if (rows < 1 || rows > kMaxRows) {
    return ffi::Error::InvalidArgument("dalle_flax_small_matmul supports 1 to " +
                                       std::to_string(kMaxRows) + " rows, got " +
                                       std::to_string(rows));
  }
  float* out = y->typed_data();
  if (K == 0 || N == 0) {
    std::fill(out, out + rows * N, 0.0f);
    return ffi::Error::Success();
  }

  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->K = K;
  job->N = N;
  job->rows = rows;
  job->chunks = std::clamp<int64_t>(K / kMinChunkRows, 1, kMaxChunks);
  job->chunk_rows = ((K + job->chunks - 1) / job->chunks + 3) & ~int64_t{3};
  job->chunks = (K + job->chunk_rows - 1) / job->chunk_rows;
  job->partials.reset(new float[job->chunks * rows * N]);

  // the calling thread works too: num_threads - 1 helpers keep one thread per core
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, job->chunks - 1);
  dalle_flax_kernels::RunOnPool(pool, job, helpers, job->chunks);

  const float* partials = job->partials.get();
  const int64_t size = rows * N;
  std::memcpy(out, partials, sizeof(float) * size);
  for (int64_t c = 1; c < job->chunks; ++c) {
    const float* p = partials + c * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleFlaxSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
