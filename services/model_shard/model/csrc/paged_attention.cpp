// Decode attention read straight from a paged KV cache: one query token per sequence.
//
// torch has no paged attention on CPU: gathering each sequence's blocks into a padded tensor and
// running two batched matmuls reads the context three times (gather read, gather write, matmul)
// and costs two dozen ops per layer. This kernel reads every key and value row once, where it
// lies, and accumulates in float32. Work is split over (sequence, KV head) pairs; the query heads
// that share a KV head are scored together, so each row is loaded once for all of them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// bfloat16 is float32's upper half: widen by shifting, which the compiler vectorizes.
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}

// exp for x <= 0 (softmax after subtracting the max), Cephes' expf polynomial: relative error
// ~1e-7, and unlike std::exp it vectorizes. Below -87 it returns ~1e-38 instead of 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// D: the head dim, a compile-time constant for the common sizes so the row loops unroll into
// whole vector registers; 0: any size, read at run time.
template <typename T, int64_t kD>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens,
                   T* out, int64_t B, int64_t H, int64_t KVH, int64_t head_dim, int64_t S, int64_t N, int64_t bs,
                   float scale) {
  const int64_t D = kD ? kD : head_dim;
  const int64_t G = H / KVH;
  // With fewer (sequence, KV head) pairs than twice the threads (one stream), each query head is
  // its own work item so that every thread has work; its rows then come from cache.
  const int64_t parts = B * KVH < 2 * at::get_num_threads() ? G : 1, Gi = G / parts;
  at::parallel_for(0, B * KVH * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Gi * D), acc(Gi * D), row(D), scores, inv_sum(Gi);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (KVH * parts), h = item / parts % KVH, g0 = item % parts * Gi, L = lens[b];
      const T* kh = k_cache + h * S * D;
      const T* vh = v_cache + h * S * D;
      const int64_t* table = tables + b * N;
      for (int64_t g = 0; g < Gi; ++g) {
        const T* qr = q + (b * H + h * G + g0 + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qr[d]) * scale;
      }
      scores.resize(Gi * L);
      float* sc = scores.data();
      float* rw = row.data();
      const float* qp = qf.data();
      for (int64_t t0 = 0; t0 < L; t0 += bs) {  // one block: its rows are contiguous
        const int64_t n = std::min(bs, L - t0), slot = table[t0 / bs] * bs;
        for (int64_t i = 0; i < n; ++i) {
          load_row(kh + (slot + i) * D, rw, D);
          for (int64_t g = 0; g < Gi; ++g) sc[g * L + t0 + i] = dot(qp + g * D, rw, D);
        }
      }
      for (int64_t g = 0; g < Gi; ++g) {
        float* s = sc + g * L;
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) {
          s[t] = exp_nonpositive(s[t] - m);
          sum += s[t];
        }
        inv_sum[g] = 1.f / sum;
      }
      float* ac = acc.data();
      std::fill(ac, ac + Gi * D, 0.f);
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const int64_t n = std::min(bs, L - t0), slot = table[t0 / bs] * bs;
        for (int64_t i = 0; i < n; ++i) {
          load_row(vh + (slot + i) * D, rw, D);
          for (int64_t g = 0; g < Gi; ++g) {
            const float p = sc[g * L + t0 + i];
            float* a = ac + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * rw[d];
          }
        }
      }
      for (int64_t g = 0; g < Gi; ++g) {
        T* o = out + (b * H + h * G + g0 + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(ac[g * D + d] * inv_sum[g]);
      }
    }
  });
}

// q [B, H, D]; k_cache, v_cache [KVH, S, D] with slot = block * block_size + offset;
// block_tables int64 [B, N]; context_lens int64 [B] (each >= 1). Returns [B, H, D] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the KV cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0, "head dims do not match");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "one block table and length per query");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
             tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D, S,
             tables.size(1), block_size, static_cast<float>(scale));
    };
    if (D == 64) run(decode_kernel<scalar_t, 64>);
    else if (D == 128) run(decode_kernel<scalar_t, 128>);
    else run(decode_kernel<scalar_t, 0>);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(llmmesh, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmmesh, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
