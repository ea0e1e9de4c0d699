// What the kernels' AVX-512 paths share. Those paths are compiled for AVX-512 in any x86-64 build
// (the container image targets x86-64-v3), through target attributes, and entered only where the
// CPU reports the instructions.
#pragma once

#if defined(__x86_64__)
#include <ATen/ATen.h>
#include <immintrin.h>

#include <type_traits>

// The base the kernels' vector paths are compiled for; a kernel adds what it needs beyond it.
#define LLMMESH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

namespace llmmesh {

// The CPU's features, read once.
inline bool avx512_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  return supported;
}

inline bool avx512_bf16_supported() {
  static const bool supported = avx512_supported() && __builtin_cpu_supports("avx512bf16");
  return supported;
}

inline bool avx512_vnni_supported() {
  static const bool supported = avx512_supported() && __builtin_cpu_supports("avx512vnni");
  return supported;
}

// 16 bfloat16 values (their bits) as float32: bfloat16 is float32's upper half.
LLMMESH_AVX512 inline __m512 bf16_widen16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Round to bfloat16, nearest even (NaN stays NaN), as c10::BFloat16 rounds; 16 lanes of bits.
LLMMESH_AVX512 inline __m256i bf16_round16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  bits = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), bits, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(bits);
}

// 16 values of T (float32, bfloat16, float16 or int8) from p, as float32.
template <typename T>
LLMMESH_AVX512 inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, int8_t>) {  // an int8 KV row's values, unscaled
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "float32, bfloat16, float16 or int8");
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

}  // namespace llmmesh
#endif
