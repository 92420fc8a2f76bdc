// One-query attention over a key/value cache for XLA:CPU, called through the XLA FFI.
//
// out[b, h, :] = softmax_s(scale * q[b, h, :] . k[b, h, s, :] over visible s) @ v[b, h, s, :]
// with q (B, H, D), k and v (B, H, S, D) head-major (each (b, h) block of keys is contiguous),
// mask (B, S) int32 (nonzero = visible). This is the attention of a decode step: one new token
// per row against the self-attention cache (S slots, of which only the first position + 1 are
// filled) or against the encoder's keys/values (masked padding). XLA runs it as two batched
// matrix-vector dots over every slot; here masked slots are skipped, so a step reads only the
// filled part of the cache, and each (b, h) is finished by one thread while its keys and values
// are in cache: logits (values prefetched meanwhile), a vectorised exp, the weighted sum.
//
// Semantics match jax.nn.softmax over logits with masked entries set to -inf: a row with no
// visible key gives NaN. Each (b, h) is computed whole by one thread, so results do not depend
// on the thread count (bitwise reproducible).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dalle_flax_kernels::Load8;
using dalle_flax_kernels::Store8;
using dalle_flax_kernels::v8f;

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline float Sum8(v8f a) {
  const v4f h = v4f{a[0], a[1], a[2], a[3]} + v4f{a[4], a[5], a[6], a[7]};
  return (h[0] + h[2]) + (h[1] + h[3]);
}

// a . b[j] for four rows b[j] = b + j * d at once (four independent accumulators).
inline void Dot4(const float* a, const float* b, int64_t d, float* out) {
  v8f acc0{}, acc1{}, acc2{}, acc3{};
  const int64_t d8 = d & ~int64_t{7};
  for (int64_t i = 0; i < d8; i += 8) {
    const v8f x = Load8(a + i);
    acc0 += x * Load8(b + i);
    acc1 += x * Load8(b + d + i);
    acc2 += x * Load8(b + 2 * d + i);
    acc3 += x * Load8(b + 3 * d + i);
  }
  float s[4] = {Sum8(acc0), Sum8(acc1), Sum8(acc2), Sum8(acc3)};
  for (int64_t i = d8; i < d; ++i) {
    for (int j = 0; j < 4; ++j) s[j] += a[i] * b[j * d + i];
  }
  std::memcpy(out, s, sizeof(s));
}

inline float Dot(const float* a, const float* b, int64_t d) {
  v8f acc{};
  const int64_t d8 = d & ~int64_t{7};
  for (int64_t i = 0; i < d8; i += 8) acc += Load8(a + i) * Load8(b + i);
  float s = Sum8(acc);
  for (int64_t i = d8; i < d; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for x <= 0 on 8 lanes (Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r), times 2^n; about 1 ulp). exp(-inf) and anything below -87 give 0.
inline v8f Exp8(v8f x) {
  const v8f tiny = v8f{} - 87.0f;
  const v8i dead = x < tiny;  // -1 where the result underflows (or x is -inf)
  x = dead ? tiny : x;
  v8f fx = x * 1.44269504088896341f + 0.5f;
  v8i n = __builtin_convertvector(fx, v8i);  // truncates toward zero
  n += __builtin_convertvector(n, v8f) > fx;  // -1 where that rounded up: floor
  const v8f nf = __builtin_convertvector(n, v8f);
  const v8f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v8f y = p * r * r + r + 1.0f;
  v8i bits = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v8f out = y * scale;
  return dead ? v8f{} : out;
}

// out[:8 * ND] = sum over visible s of w[s] * v[s, :] with the sum in registers (ND <= 16
// vectors: the head sizes of the released models are 64).
template <int ND>
void WeightedSum(const float* w, const int32_t* mask, const float* v, int64_t S, float* out) {
  v8f acc[ND] = {};
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    const v8f ws = v8f{} + w[s];
    for (int i = 0; i < ND; ++i) acc[i] += ws * Load8(v + s * 8 * ND + 8 * i);
  }
  for (int i = 0; i < ND; ++i) Store8(out + 8 * i, acc[i]);
}

// out[:d] += w * v[:d]
inline void Axpy(float w, const float* v, float* out, int64_t d) {
  const int64_t d8 = d & ~int64_t{7};
  const v8f wv = v8f{} + w;
  for (int64_t i = 0; i < d8; i += 8) Store8(out + i, Load8(out + i) + wv * Load8(v + i));
  for (int64_t i = d8; i < d; ++i) out[i] += w * v[i];
}

// Work shared by the caller and the pool tasks (see RunOnPool): one item per (b, h).
struct Job {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* mask;
  float* out;
  int64_t B, H, S, D;
  float scale;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Unit(int64_t unit, float* weights) const {
    const int64_t b = unit / H;
    const float* qp = q + unit * D;
    const float* kp = k + unit * S * D;
    const float* vp = v + unit * S * D;
    const int32_t* mp = mask + b * S;
    float* op = out + unit * D;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    float top = neg_inf;
    int64_t s = 0;
    while (s < S) {  // logits of the visible slots, four at a time where four are visible
      if (s + 4 <= S && mp[s] && mp[s + 1] && mp[s + 2] && mp[s + 3]) {
        Dot4(qp, kp + s * D, D, weights + s);
        // bring the same slots' values in while the keys stream: two memory streams per
        // thread instead of one, and the weighted sum below then reads from cache
        for (int64_t line = 0; line < 4 * D; line += 16) __builtin_prefetch(vp + s * D + line, 0, 3);
        for (int j = 0; j < 4; ++j) {
          weights[s + j] *= scale;
          top = std::max(top, weights[s + j]);
        }
        s += 4;
      } else {
        weights[s] = mp[s] ? Dot(qp, kp + s * D, D) * scale : neg_inf;
        if (mp[s]) top = std::max(top, weights[s]);
        s += 1;
      }
    }
    if (top == neg_inf) {  // softmax over no key: NaN, as jax.nn.softmax of all -inf
      std::fill(op, op + D, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    v8f sum8{};
    const int64_t s8 = S & ~int64_t{7};
    for (s = 0; s < s8; s += 8) {
      const v8f e = Exp8(Load8(weights + s) - top);
      Store8(weights + s, e);
      sum8 += e;
    }
    float total = Sum8(sum8);
    for (; s < S; ++s) {
      weights[s] = mp[s] ? std::exp(weights[s] - top) : 0.0f;
      total += weights[s];
    }
    const float inv = 1.0f / total;
    for (s = 0; s < S; ++s) weights[s] *= inv;
    switch (D) {
      case 32: WeightedSum<4>(weights, mp, vp, S, op); break;
      case 64: WeightedSum<8>(weights, mp, vp, S, op); break;
      case 128: WeightedSum<16>(weights, mp, vp, S, op); break;
      default:
        std::fill(op, op + D, 0.0f);
        for (s = 0; s < S; ++s) {
          if (mp[s]) Axpy(weights[s], vp + s * D, op, D);
        }
    }
  }

  // Starts loading the first visible keys and values of a unit (up to kPrefetchBytes of each):
  // a unit's rows are only a few KB when few slots are visible (the text), too short for the
  // hardware prefetcher to ramp up, so without this a call waits on one miss after another.
  void Prefetch(int64_t unit) const {
    constexpr int64_t kPrefetchBytes = 2048, kLine = 64 / sizeof(float);
    const int32_t* mp = mask + (unit / H) * S;
    int64_t budget = kPrefetchBytes / sizeof(float);
    for (int64_t s = 0; s < S && budget > 0; ++s) {
      if (!mp[s]) continue;
      for (int64_t i = 0; i < D; i += kLine) {
        __builtin_prefetch(k + (unit * S + s) * D + i, 0, 3);
        __builtin_prefetch(v + (unit * S + s) * D + i, 0, 3);
      }
      budget -= D;
    }
  }

  void RunAvailable() {
    std::vector<float> weights(S);
    const int64_t units = B * H;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) {
      if (u + 1 < units) Prefetch(u + 1);
      Unit(u, weights.data());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Below this many visible key floats in all, one thread does the whole call (waking a pool
// thread costs more than it saves).
constexpr int64_t kMinParallelFloats = 1 << 15;

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> mask, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  const auto md = mask.dimensions();
  const auto od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || od.size() != 3) {
    return ffi::Error::InvalidArgument(
        "dalle_flax_decode_attention expects q (B, H, D), k and v (B, H, S, D), mask (B, S), "
        "out (B, H, D)");
  }
  const int64_t B = qd[0], H = qd[1], D = qd[2], S = kd[2];
  const bool ok = kd[0] == B && kd[1] == H && kd[3] == D && vd[0] == B && vd[1] == H &&
                  vd[2] == S && vd[3] == D && md[0] == B && md[1] == S && od[0] == B &&
                  od[1] == H && od[2] == D;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "dalle_flax_decode_attention: shapes do not match: q (" + std::to_string(B) + ", " +
        std::to_string(H) + ", " + std::to_string(D) + "), k (" + std::to_string(kd[0]) + ", " +
        std::to_string(kd[1]) + ", " + std::to_string(kd[2]) + ", " + std::to_string(kd[3]) +
        "), mask (" + std::to_string(md[0]) + ", " + std::to_string(md[1]) + ")");
  }
  auto job = std::make_shared<Job>();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->mask = mask.typed_data();
  job->out = out->typed_data();
  job->B = B;
  job->H = H;
  job->S = S;
  job->D = D;
  job->scale = scale;
  const int64_t units = B * H;
  if (units == 0) return ffi::Error::Success();

  int64_t visible = 0;
  for (int64_t i = 0; i < B * S; ++i) visible += job->mask[i] != 0;
  const int64_t work = 2 * visible * H * D;  // key and value floats read
  const int64_t helpers =
      work < kMinParallelFloats ? 0 : std::min<int64_t>(pool.num_threads() - 1, units - 1);
  dalle_flax_kernels::RunOnPool(pool, job, helpers, units);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleFlaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
