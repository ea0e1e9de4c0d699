// Decode attention read straight from a paged KV cache: one query token per sequence.
//
// torch has no paged attention on CPU: gathering each sequence's blocks into a padded tensor and
// running two batched matmuls reads the context three times (gather read, gather write, matmul)
// and costs two dozen ops per layer. This kernel reads every key and value row once, where it
// lies, and accumulates in float32. Work is split over (sequence, KV head) pairs; the query heads
// that share a KV head are scored together, so each row is loaded once for all of them. Items run KV
// head by KV head: a prompt's rows all read one sequence's cache, and one head's keys and values
// (512 KiB at 2 000 tokens) stay in L2 where all heads' would not (2 000-token prefill: attention
// 2.30 -> 2.11 s on the 2-core EPYC, AVX512-BF16).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "avx512.h"
#include "kernels.h"
#include "kv_int8.h"
#include "vec_math.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace llmmesh {
namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// A cached row's width in C's (an int8 row carries its scale, kv_int8.h), and its scale (1 for a
// float row: multiplying by it is exact, so float caches keep their numbers).
template <typename C>
constexpr int64_t row_width(int64_t D) {
  return std::is_same_v<C, int8_t> ? D + kInt8ScaleBytes : D;
}

template <typename C>
inline float row_scale(const C* row, int64_t D) {
  if constexpr (std::is_same_v<C, int8_t>) return kv_row_scale(row, D);
  return 1.f;
}

// bfloat16 is float32's upper half: widen by shifting, which the compiler vectorizes.
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}

// Scores in place to exp(score - max); returns 1 / their sum, the normalisation left to apply.
inline float softmax_unnormalized(float* s, int64_t L) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  return 1.f / sum;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Query heads per work item. With fewer (sequence, KV head) pairs than twice the threads (one
// stream), each query head is its own work item so that every thread has work; its rows then come
// from cache.
inline int64_t work_item_heads(int64_t B, int64_t G, int64_t KVH) {
  return B * KVH < 2 * at::get_num_threads() ? 1 : G;
}

// D: the head dim, a compile-time constant for the common sizes so the row loops unroll into
// whole vector registers; 0: any size, read at run time. C: the cache's element type, T or int8_t.
template <typename T, typename C, int64_t kD>
void decode_kernel(const T* q, const C* k_cache, const C* v_cache, const int64_t* tables, const int64_t* lens,
                   T* out, int64_t B, int64_t H, int64_t KVH, int64_t head_dim, int64_t S, int64_t N, int64_t bs,
                   float scale) {
  const int64_t D = kD ? kD : head_dim, W = row_width<C>(D);
  const int64_t G = H / KVH, Gi = work_item_heads(B, G, KVH), parts = G / Gi;
  at::parallel_for(0, B * KVH * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Gi * D), acc(Gi * D), row(D), scores, inv_sum(Gi);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / (B * parts), b = item / parts % B, g0 = item % parts * Gi, L = lens[b];
      const C* kh = k_cache + h * S * W;
      const C* vh = v_cache + h * S * W;
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
          const C* kr = kh + (slot + i) * W;
          load_row(kr, rw, D);
          const float ks = row_scale(kr, D);
          for (int64_t g = 0; g < Gi; ++g) sc[g * L + t0 + i] = dot(qp + g * D, rw, D) * ks;
        }
      }
      for (int64_t g = 0; g < Gi; ++g) inv_sum[g] = softmax_unnormalized(sc + g * L, L);
      float* ac = acc.data();
      std::fill(ac, ac + Gi * D, 0.f);
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const int64_t n = std::min(bs, L - t0), slot = table[t0 / bs] * bs;
        for (int64_t i = 0; i < n; ++i) {
          const C* vr = vh + (slot + i) * W;
          load_row(vr, rw, D);
          const float vs = row_scale(vr, D);
          for (int64_t g = 0; g < Gi; ++g) {
            const float p = sc[g * L + t0 + i] * vs;
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

#if defined(__x86_64__)
// The AVX-512 path. The scalar loops above end every key's dot product in a horizontal sum and
// keep the output accumulators in memory; here 16 keys' dot products are reduced together by one
// transpose-add tree, and each query head's output row stays in registers (kG is a compile-time
// head count so the arrays below unroll into registers).
//
// Compiled for AVX-512 whatever the build's -march (avx512.h) and entered where the CPU has it;
// the bfloat16 dot product instruction only where the CPU has that too.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")

// Lane i of the result is the sum of v[i]'s 16 lanes.
inline __m512 transpose_sum16(const __m512* v) {
  __m512 s[8], t[4], u[2];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: rows 4j..4j+3, each summed over its lane
    const __m512d a = _mm512_castps_pd(s[2 * j]), b = _mm512_castps_pd(s[2 * j + 1]);
    t[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int j = 0; j < 2; ++j)  // fold the four 128-bit lanes pairwise
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// q·k for one query head over D dims, as 16 partial sums. bfloat16 with AVX512-BF16 multiplies
// the raw pairs (exact products, float32 sums); otherwise both sides are widened to float32.
template <typename T, int64_t kD, bool kDpbf16>
struct QueryRow {
  __m512 q[kD / 16];
  void load(const T* src) {
    for (int64_t c = 0; c < kD / 16; ++c) q[c] = load16(src + 16 * c);
  }
  template <typename K>
  __m512 dot(const K* k) const {
    __m512 acc = _mm512_mul_ps(q[0], load16(k));
    for (int64_t c = 1; c < kD / 16; ++c) acc = _mm512_fmadd_ps(q[c], load16(k + 16 * c), acc);
    return acc;
  }
};

template <int64_t kD>
struct QueryRow<c10::BFloat16, kD, true> {
  __m512bh q[kD / 32];
  void load(const c10::BFloat16* src) {
    for (int64_t c = 0; c < kD / 32; ++c) q[c] = (__m512bh)_mm512_loadu_si512(src + 32 * c);
  }
  __m512 dot(const c10::BFloat16* k) const {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < kD / 32; ++c) acc = _mm512_dpbf16_ps(acc, q[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
    return acc;
  }
};

// Asks for the rows of the next block while this one is scored: blocks lie anywhere in the cache,
// so the hardware prefetcher does not run ahead across them (32 streams, caches cold: 410 -> ~320 us
// a layer).
constexpr int64_t kAhead = 2;  // blocks

template <typename R, int64_t kW>
inline void prefetch_rows(const R* rows, int64_t n) {
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t off = 0; off < n * kW * static_cast<int64_t>(sizeof(R)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// R: the cache's element type, T or int8_t (rows of kW = kD + 2 bytes, their scale last: kv_int8.h).
// An int8 key's scale multiplies its score and a value's scale its probability, so rows are
// widened to float32 as they are and the arithmetic is the float kernel's.
template <typename T, typename R, int64_t kD, int64_t kG, bool kDpbf16>
void decode_kernel_avx512(const T* q, const R* k_cache, const R* v_cache, const int64_t* tables, const int64_t* lens,
                          T* out, int64_t B, int64_t H, int64_t KVH, int64_t S, int64_t N, int64_t bs, float scale) {
  constexpr int64_t C = kD / 16, kW = row_width<R>(kD);
  constexpr bool kInt8 = std::is_same_v<R, int8_t>;
  const int64_t G = H / KVH, parts = G / kG;
  const __m512 vscale = _mm512_set1_ps(scale);
  at::parallel_for(0, B * KVH * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / (B * parts), b = item / parts % B, g0 = item % parts * kG, L = lens[b];
      const R* kh = k_cache + h * S * kW;
      const R* vh = v_cache + h * S * kW;
      const int64_t* table = tables + b * N;
      const T* qb = q + (b * H + h * G + g0) * kD;
      QueryRow<T, kD, kDpbf16> qr[kG];
      for (int64_t g = 0; g < kG; ++g) qr[g].load(qb + g * kD);
      scores.resize(kG * L);
      float* sc = scores.data();
      for (int64_t t0 = 0; t0 < L; t0 += bs) {  // one block: its rows are contiguous
        const int64_t n = std::min(bs, L - t0);
        const R* rows = kh + table[t0 / bs] * bs * kW;
        const int64_t ahead = t0 + kAhead * bs;
        if (ahead < L) prefetch_rows<R, kW>(kh + table[ahead / bs] * bs * kW, std::min(bs, L - ahead));
        else if (ahead - L < bs * kAhead) prefetch_rows<R, kW>(vh + table[(ahead - L) / bs] * bs * kW, bs);  // values next
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
          const int64_t m = std::min<int64_t>(16, n - i0);
          __m512 key_scale = vscale;
          if constexpr (kInt8) {
            alignas(64) float ks[16] = {};
            for (int64_t i = 0; i < m; ++i) ks[i] = kv_row_scale(rows + (i0 + i) * kW, kD);
            key_scale = _mm512_mul_ps(_mm512_load_ps(ks), vscale);
          }
          for (int64_t g = 0; g < kG; ++g) {
            __m512 dots[16];
            for (int64_t i = 0; i < 16; ++i) dots[i] = i < m ? qr[g].dot(rows + (i0 + i) * kW) : _mm512_setzero_ps();
            _mm512_mask_storeu_ps(sc + g * L + t0 + i0, static_cast<__mmask16>((1u << m) - 1),
                                  _mm512_mul_ps(transpose_sum16(dots), key_scale));
          }
        }
      }
      float inv_sum[kG];
      for (int64_t g = 0; g < kG; ++g) inv_sum[g] = softmax_unnormalized(sc + g * L, L);
      __m512 acc[kG][C];
      for (int64_t g = 0; g < kG; ++g)
        for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const int64_t n = std::min(bs, L - t0);
        const R* rows = vh + table[t0 / bs] * bs * kW;
        const int64_t ahead = t0 + kAhead * bs;
        if (ahead < L) prefetch_rows<R, kW>(vh + table[ahead / bs] * bs * kW, std::min(bs, L - ahead));
        for (int64_t i = 0; i < n; ++i) {
          __m512 v[C];
          for (int64_t c = 0; c < C; ++c) v[c] = load16(rows + i * kW + 16 * c);
          const float vs = row_scale(rows + i * kW, kD);
          for (int64_t g = 0; g < kG; ++g) {
            const __m512 p = _mm512_set1_ps(kInt8 ? sc[g * L + t0 + i] * vs : sc[g * L + t0 + i]);
            for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
          }
        }
      }
      for (int64_t g = 0; g < kG; ++g) {
        alignas(64) float row[kD];
        for (int64_t c = 0; c < C; ++c) _mm512_store_ps(row + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_sum[g])));
        T* o = out + (b * H + h * G + g0 + g) * kD;
        for (int64_t d = 0; d < kD; ++d) o[d] = static_cast<T>(row[d]);
      }
    }
  });
}

// Runs the vector kernel when D and the query heads per work item have an instance; false otherwise.
// Call it only where avx512_supported(): the whole function is compiled for AVX-512.
template <typename T, typename R>
bool run_avx512(const T* q, const R* k_cache, const R* v_cache, const int64_t* tables, const int64_t* lens, T* out,
                int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t S, int64_t N, int64_t bs, float scale) {
  bool ran = false;
  if constexpr (!std::is_same_v<T, double>) {
    // The bfloat16 pair products need bfloat16 keys: int8 rows are widened to float32.
    const bool dpbf16 = std::is_same_v<T, c10::BFloat16> && std::is_same_v<R, T> && avx512_bf16_supported();
    const int64_t Gi = work_item_heads(B, H / KVH, KVH);
    auto with_d = [&](auto d) {
      auto with_g = [&](auto g) {
        if (Gi == decltype(g)::value) {
          constexpr int64_t kD = decltype(d)::value, kG = decltype(g)::value;
          auto kernel = decode_kernel_avx512<T, R, kD, kG, false>;
          if constexpr (std::is_same_v<R, T>) {
            if (dpbf16) kernel = decode_kernel_avx512<T, R, kD, kG, true>;
          }
          kernel(q, k_cache, v_cache, tables, lens, out, B, H, KVH, S, N, bs, scale);
          ran = true;
        }
      };
      with_g(std::integral_constant<int64_t, 1>{});
      with_g(std::integral_constant<int64_t, 2>{});
      with_g(std::integral_constant<int64_t, 3>{});
      with_g(std::integral_constant<int64_t, 4>{});
      with_g(std::integral_constant<int64_t, 8>{});
    };
    if (D == 64) with_d(std::integral_constant<int64_t, 64>{});
    if (D == 128) with_d(std::integral_constant<int64_t, 128>{});
  }
  return ran;
}
#pragma GCC pop_options
#endif

}  // namespace

// q [B, H, D]; k_cache, v_cache [KVH, S, D] in q's dtype, or int8 [KVH, S, D + 2] (kv_int8.h), with
// slot = block * block_size + offset;
// block_tables int64 [B, N]; context_lens int64 [B] (each >= 1). Returns [B, H, D] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK((int8 || q.scalar_type() == k_cache.scalar_type()) && k_cache.scalar_type() == v_cache.scalar_type(),
              "the KV cache must be int8 or share q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D + (int8 ? kInt8ScaleBytes : 0) && H % KVH == 0, "head dims do not match");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "one block table and length per query");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto with_cache = [&](auto* k, auto* v) {
      using R = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
      auto run = [&](auto kernel) {
        return kernel(qc.data_ptr<scalar_t>(), k, v, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                      out.data_ptr<scalar_t>(), B, H, KVH, D, S, tables.size(1), block_size, static_cast<float>(scale));
      };
#if defined(__x86_64__)
      if (avx512_supported() && run(run_avx512<scalar_t, R>)) return;
#endif
      if (D == 64) run(decode_kernel<scalar_t, R, 64>);
      else if (D == 128) run(decode_kernel<scalar_t, R, 128>);
      else run(decode_kernel<scalar_t, R, 0>);
    };
    if (int8) with_cache(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    else with_cache(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace llmmesh
