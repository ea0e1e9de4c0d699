// Rotary embedding of queries and keys, and the write of keys and values into the paged KV cache,
// in one pass over a layer's fused qkv projection.
//
// In torch this is a dozen ops per layer (casts, the rotation's muls and adds, transposes, two
// index_copy_ calls); at one token per step their dispatch costs more than their arithmetic.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "kv_int8.h"

#include <tuple>
#include <type_traits>

namespace llmmesh {
namespace {

// A key or value row into the cache: as it is (C = T), or quantized (C = int8_t, kv_int8.h).
template <typename T, typename C>
inline void cache_row(const T* x, C* dst, int64_t dim) {
  if constexpr (std::is_same_v<C, int8_t>) {
    quantize_kv_row(x, dst, dim);
  } else {
    for (int64_t i = 0; i < dim; ++i) dst[i] = x[i];
  }
}

// C: the cache's element type, T or int8_t; a cached row is `width` C's (dim, or dim + the int8 scale).
template <typename T, typename C>
void rope_cache_kernel(const T* qkv, const float* cos, const float* signed_sin, const int64_t* slots, T* q_out,
                       T* k_out, C* k_cache, C* v_cache, int64_t tokens, int64_t heads, int64_t kv_heads,
                       int64_t dim, int64_t cache_slots) {
  const int64_t half = dim / 2, row = (heads + 2 * kv_heads) * dim;
  const int64_t width = std::is_same_v<C, int8_t> ? dim + kInt8ScaleBytes : dim;
  at::parallel_for(0, tokens * (heads + 2 * kv_heads), 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / (heads + 2 * kv_heads), h = item % (heads + 2 * kv_heads);
      const T* x = qkv + t * row + h * dim;
      if (h >= heads + kv_heads) {  // a value head: straight into the cache
        cache_row(x, v_cache + ((h - heads - kv_heads) * cache_slots + slots[t]) * width, dim);
        continue;
      }
      const float* c = cos + t * dim;
      const float* s = signed_sin + t * dim;
      // rotate_half(x) * sin == roll(x, half) * (sin with its first half negated)
      T* dst = h < heads ? q_out + (t * heads + h) * dim : k_out + (t * kv_heads + h - heads) * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const float rolled = static_cast<float>(x[i < half ? i + half : i - half]);
        dst[i] = static_cast<T>(static_cast<float>(x[i]) * c[i] + rolled * s[i]);
      }
      if (h >= heads) cache_row(dst, k_cache + ((h - heads) * cache_slots + slots[t]) * width, dim);
    }
  });
}

}  // namespace

// qkv [T, (H + 2 * KVH) * D]; cos, signed_sin float32 [T, D]; slots int64 [T];
// k_cache, v_cache [KVH, S, D] in qkv's dtype, or int8 [KVH, S, D + 2] (kv_int8.h), written at the tokens' slots. Returns the rotated (q [T, H, D], k [T, KVH, D]).
std::tuple<at::Tensor, at::Tensor> rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos,
                                                  const at::Tensor& signed_sin, const at::Tensor& slots,
                                                  at::Tensor k_cache, at::Tensor v_cache, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK((int8 || qkv.scalar_type() == k_cache.scalar_type()) && k_cache.scalar_type() == v_cache.scalar_type(),
              "the KV cache must be int8 or share qkv's dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && signed_sin.scalar_type() == at::kFloat, "cos/sin must be float32");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots must be int64");
  const int64_t T = qkv.size(0), KVH = k_cache.size(0), S = k_cache.size(1), D = k_cache.size(2) - (int8 ? kInt8ScaleBytes : 0);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * KVH) * D && cos.sizes() == signed_sin.sizes() && cos.size(0) == T &&
                  cos.size(1) == D && slots.size(0) == T,
              "qkv, cos/sin and slots do not match the cache");
  auto x = qkv.contiguous();
  auto c = cos.contiguous(), s = signed_sin.contiguous(), sl = slots.contiguous();
  auto q_out = at::empty({T, heads, D}, qkv.options());
  auto k_out = at::empty({T, KVH, D}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_cache", [&] {
    auto run = [&](auto* k, auto* v) {
      rope_cache_kernel(x.data_ptr<scalar_t>(), c.data_ptr<float>(), s.data_ptr<float>(), sl.data_ptr<int64_t>(),
                        q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), k, v, T, heads, KVH, D, S);
    };
    if (int8) run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    else run(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
  });
  return {q_out, k_out};
}

}  // namespace llmmesh
