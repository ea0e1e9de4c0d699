// 4-bit weight linear layer with 8-bit activations (W4A8), the scheme of llama.cpp's Q4_1 x Q8 path.
//
// Weights: asymmetric 4-bit per group of 32 input channels, w = d * q + m with q in [0, 15] and
// d, m stored as float16 (the Q4_1 layout). Activations: each row's groups of 32 are quantized
// on the fly to int8 with one float scale per group, xd = max|x| / 127. Then per output and group
//
//   sum_k w_k x_k  ~=  d * xd * sum_k q_k xq_k  +  m * sum_k x_k
//
// and the integer dot product is one VNNI instruction per 4 inputs x 16 outputs (u8 x s8). torch's
// int4 CPU matmul dequantizes every weight to float instead: one stream is bound by those
// conversions, not by the memory that holds the weights.
//
// The integer sums are exact and each output adds its groups in the same order whatever the
// number of rows or how they are tiled, so a row's result does not depend on the batch around it.
//
// Packed weight layout, per block of 16 outputs and group of 32 inputs (320 bytes, blocks in
// output order, groups in input order): 4 x 64 bytes of quants, then d[16] and m[16] as float16.
// In the j-th 64 bytes, the 4 bytes of output lane l hold inputs 8j..8j+3 in their low nibbles and
// 8j+4..8j+7 in their high nibbles: masking gives inputs 8j..8j+3 of all 16 outputs in one
// register, shifting the next 4.
//
// The kernel needs AVX-512 with VNNI (int4_supported()); elsewhere Int4Linear runs torch's kernel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMMESH_INT4_VNNI 1
#include <immintrin.h>
#endif

namespace llmmesh {
namespace {

constexpr int64_t kGroup = 32;     // inputs per scale
constexpr int64_t kLanes = 16;     // outputs per block
constexpr int64_t kQuantBytes = kLanes * kGroup / 2;
constexpr int64_t kGroupBytes = kQuantBytes + 2 * kLanes * 2;  // quants, d and m as float16

// One row of activations quantized per group: int8 values, the group's scale and its float sum.
struct QuantizedRows {
  at::Tensor q, scale, sum;  // [M, K] int8, [M, G] float, [M, G] float
};

#if defined(LLMMESH_INT4_VNNI)
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {  // float32's upper half
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// Group i of the rows: 32 values to int8 (round to nearest even, as nearbyint), scale and sum.
template <typename T>
inline void quantize_group(const T* x, int8_t* q, float* scale, float* sum, int64_t i) {
  const __m512 lo = load16(x + i * kGroup), hi = load16(x + i * kGroup + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float d = amax / 127.f;
  const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kGroup),
                   _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kGroup + 16),
                   _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv))));
  scale[i] = d;
  sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
}

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t G = K / kGroup;
  QuantizedRows out{at::empty({M, K}, at::kChar), at::empty({M, G}, at::kFloat), at::empty({M, G}, at::kFloat)};
  int8_t* q = out.q.data_ptr<int8_t>();
  float* scale = out.scale.data_ptr<float>();
  float* sum = out.sum.data_ptr<float>();
  at::parallel_for(0, M * G, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_group(x, q, scale, sum, i);
  });
  return out;
}

template <typename T>
inline void store_lanes(const float* acc, T* out) {
  for (int64_t l = 0; l < kLanes; ++l) out[l] = static_cast<T>(acc[l]);
}

// Output block `nb` for R rows from r0: the block's weights are unpacked once per group and
// multiplied with each row's activations, 4 inputs x 16 outputs per instruction.
template <int R, typename T>
void block(const uint8_t* w, const QuantizedRows& x, T* out, int64_t nb, int64_t r0, int64_t K, int64_t N) {
  const int64_t G = K / kGroup;
  const int8_t* xq = x.q.data_ptr<int8_t>() + r0 * K;
  const float* xd = x.scale.data_ptr<float>() + r0 * G;
  const float* xs = x.sum.data_ptr<float>() + r0 * G;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* blk = w + nb * G * kGroupBytes;
  for (int64_t g = 0; g < G; ++g, blk += kGroupBytes) {
    __m512i wq[8];
    for (int j = 0; j < 4; ++j) {
      const __m512i packed = _mm512_loadu_si512(blk + 64 * j);
      wq[2 * j] = _mm512_and_si512(packed, low4);
      wq[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQuantBytes)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQuantBytes + 32)));
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = xq + r * K + g * kGroup;
      __m512i dot = _mm512_setzero_si512();
      for (int c = 0; c < 8; ++c) {
        int32_t four;
        std::memcpy(&four, xr + 4 * c, 4);
        dot = _mm512_dpbusd_epi32(dot, wq[c], _mm512_set1_epi32(four));
      }
      const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[r * G + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * G + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float lanes[kLanes];
    _mm512_store_ps(lanes, acc[r]);
    store_lanes(lanes, out + (r0 + r) * N + nb * kLanes);
  }
}
#endif  // LLMMESH_INT4_VNNI

}  // namespace

bool int4_supported() {
#if defined(LLMMESH_INT4_VNNI)
  return true;
#else
  return false;
#endif
}

// x [M, K] (float32, bfloat16 or float16); packed from int4_pack_weight; returns [M, N] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(int4_supported(), "the int4 kernel needs AVX-512 with VNNI, which this build lacks");
  TORCH_CHECK(x.dim() == 2, "x must be [rows, in_features]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup == 0 && N % kLanes == 0, "in_features must be a multiple of 32, out_features of 16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (N / kLanes) * (K / kGroup) * kGroupBytes,
              "packed weights do not match [", N, ", ", K, "]");
  auto xc = x.contiguous();
  auto out = at::empty({M, N}, x.options());
#if defined(LLMMESH_INT4_VNNI)
  if (M == 0) return out;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_linear", [&] {
    const QuantizedRows rows = quantize_rows(xc.data_ptr<scalar_t>(), M, K);
    scalar_t* o = out.data_ptr<scalar_t>();
    // Threads split the output blocks; each runs all rows through its blocks, eight at a time, so
    // a block's weights are read from memory once and stay in L1 for the rows after the first.
    at::parallel_for(0, N / kLanes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nb = begin; nb < end; ++nb) {
        int64_t r = 0;
        for (; r + 8 <= M; r += 8) block<8>(w, rows, o, nb, r, K, N);
        if (r + 4 <= M) {
          block<4>(w, rows, o, nb, r, K, N);
          r += 4;
        }
        switch (M - r) {
          case 3: block<3>(w, rows, o, nb, r, K, N); break;
          case 2: block<2>(w, rows, o, nb, r, K, N); break;
          case 1: block<1>(w, rows, o, nb, r, K, N); break;
        }
      }
    });
  });
#endif
  return out;
}

// q [N, K] integers in [0, 15]; d, m [N, K / 32] float32 (w = d * q + m). Returns the packed bytes.
at::Tensor int4_pack_weight(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(q.dim() == 2, "q must be [out_features, in_features]");
  const int64_t N = q.size(0), K = q.size(1), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0 && N % kLanes == 0, "in_features must be a multiple of 32, out_features of 16");
  TORCH_CHECK(d.sizes() == m.sizes() && d.size(0) == N && d.size(1) == G, "d and m must be [out_features, in / 32]");
  auto qc = q.to(at::kInt).contiguous();
  auto dc = d.to(at::kHalf).contiguous();
  auto mc = m.to(at::kHalf).contiguous();
  TORCH_CHECK(qc.min().item<int>() >= 0 && qc.max().item<int>() <= 15, "quants must lie in [0, 15]");
  auto packed = at::empty({N / kLanes * G * kGroupBytes}, at::kByte);
  const int32_t* qp = qc.data_ptr<int32_t>();
  const at::Half* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = mc.data_ptr<at::Half>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  for (int64_t nb = 0; nb < N / kLanes; ++nb)
    for (int64_t g = 0; g < G; ++g) {
      uint8_t* blk = out + (nb * G + g) * kGroupBytes;
      at::Half* bd = reinterpret_cast<at::Half*>(blk + kQuantBytes);
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t n = nb * kLanes + l;
        const int32_t* qr = qp + n * K + g * kGroup;
        for (int64_t j = 0; j < 4; ++j)
          for (int64_t b = 0; b < 4; ++b)
            blk[64 * j + 4 * l + b] = static_cast<uint8_t>(qr[8 * j + b] | (qr[8 * j + 4 + b] << 4));
        bd[l] = dp[n * G + g];
        bd[kLanes + l] = mp[n * G + g];
      }
    }
  return packed;
}

}  // namespace llmmesh
