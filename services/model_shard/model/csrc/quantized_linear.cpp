// Linear layers with 4- or 8-bit weights and 8-bit activations (W4A8, W8A8): llama.cpp's scheme.
//
// Activations: each row's groups of 32 inputs are quantized on the fly to int8 with one float
// scale per group, xd = max|x| / 127. The products of a group are then integer dot products, one
// VNNI instruction (u8 x s8) per 4 inputs x 16 outputs, and a float multiply-add per group:
//
//   int4, w = d * q + m per group (q in [0, 15]; d, m float16: the Q4_1 layout)
//       sum_k w_k x_k  ~=  d * xd * sum_k q_k xq_k  +  m * sum_k x_k
//   int8, w = s * q per output channel (q in [-127, 127], stored as q + 128 for the unsigned operand)
//       sum_k w_k x_k  ~=  s * xd * (sum_k (q_k + 128) xq_k  -  128 * sum_k xq_k)
//
// torch's int4 and int8 CPU matmuls convert every weight to float instead: one stream is bound by
// those conversions, not by the memory that holds the weights.
//
// The integer sums are exact and each output adds its groups in the same order whatever the
// number of rows or how they are tiled, so a row's result does not depend on the batch around it.
//
// Packed weights come in blocks of 16 outputs, and within a block in groups of 32 inputs (blocks
// in output order, groups in input order). A group is 8 registers' worth of u8 quants, register c
// holding inputs 4c..4c+3 of the 16 outputs (4 bytes per output lane):
//   int8: 8 x 64 bytes as they are.
//   int4: 4 x 64 bytes, byte pairs nibble-packed (register 2j in the low nibbles of the j-th 64
//         bytes, 2j+1 in the high ones), then d[16] and m[16] as float16: 320 bytes.
//
// The kernels need a CPU with AVX-512 VNNI (vnni_supported()); elsewhere the model keeps torch's kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "avx512.h"
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#define LLMMESH_VNNI 1
// The kernels are compiled for AVX-512 VNNI whatever the build's -march (avx512.h) and run only
// where the CPU has it (vnni_supported).
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#endif

namespace llmmesh {
namespace {

constexpr int64_t kGroup = 32;  // inputs per activation scale (and per int4 weight scale)
constexpr int64_t kLanes = 16;  // outputs per block
constexpr int64_t kInt4QuantBytes = kLanes * kGroup / 2;
constexpr int64_t kInt4GroupBytes = kInt4QuantBytes + 2 * kLanes * 2;  // quants, d and m as float16
constexpr int64_t kInt8GroupBytes = kLanes * kGroup;

void check_shape(int64_t N, int64_t K) {
  TORCH_CHECK(K % kGroup == 0 && N % kLanes == 0, "in_features must be a multiple of 32, out_features of 16");
}

#if defined(LLMMESH_VNNI)
// Rows of activations quantized per group: int8 values, the group's scale, the float sum of its
// values and the integer sum of its quants.
struct QuantizedRows {
  at::Tensor q, scale, sum, qsum;  // [M, K] int8; [M, G] float, float, int32
};

// Round to nearest even (the default rounding mode), within [-127, 127].
VNNI_TARGET inline __m512i to_int8_range(__m512 v, __m512 inv) {
  const __m512i lim = _mm512_set1_epi32(127);
  return _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), lim),
                          _mm512_sub_epi32(_mm512_setzero_si512(), lim));
}

template <typename T>
VNNI_TARGET void quantize_groups(const T* x, const QuantizedRows& out, int64_t begin, int64_t end) {
  int8_t* q = out.q.data_ptr<int8_t>();
  float* scale = out.scale.data_ptr<float>();
  float* sum = out.sum.data_ptr<float>();
  int32_t* qsum = out.qsum.data_ptr<int32_t>();
  for (int64_t i = begin; i < end; ++i) {
    const __m512 lo = load16(x + i * kGroup), hi = load16(x + i * kGroup + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i qlo = to_int8_range(lo, inv), qhi = to_int8_range(hi, inv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kGroup), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kGroup + 16), _mm512_cvtepi32_epi8(qhi));
    scale[i] = d;
    sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    qsum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  }
}

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t G = K / kGroup;
  QuantizedRows out{at::empty({M, K}, at::kChar), at::empty({M, G}, at::kFloat), at::empty({M, G}, at::kFloat),
                    at::empty({M, G}, at::kInt)};
  at::parallel_for(0, M * G, 256, [&](int64_t begin, int64_t end) { quantize_groups(x, out, begin, end); });
  return out;
}

// The integer dot products of one row's group with the 8 weight registers of a block's group.
VNNI_TARGET inline __m512i group_dot(const __m512i* wq, const int8_t* xr) {
  __m512i dot = _mm512_setzero_si512();
  for (int c = 0; c < 8; ++c) {
    int32_t four;
    std::memcpy(&four, xr + 4 * c, 4);
    dot = _mm512_dpbusd_epi32(dot, wq[c], _mm512_set1_epi32(four));
  }
  return dot;
}

template <typename T>
VNNI_TARGET inline void store_lanes(__m512 acc, T* out) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, acc);
  for (int64_t l = 0; l < kLanes; ++l) out[l] = static_cast<T>(lanes[l]);
}

// The quantized activations of the rows from r0, group by group.
struct RowTile {
  const int8_t* q;
  const float *scale, *sum;
  const int32_t* qsum;
  int64_t K, G;

  RowTile(const QuantizedRows& x, int64_t r0, int64_t K)
      : q(x.q.data_ptr<int8_t>() + r0 * K), scale(x.scale.data_ptr<float>() + r0 * (K / kGroup)),
        sum(x.sum.data_ptr<float>() + r0 * (K / kGroup)), qsum(x.qsum.data_ptr<int32_t>() + r0 * (K / kGroup)),
        K(K), G(K / kGroup) {}
  const int8_t* quants(int r, int64_t g) const { return q + r * K + g * kGroup; }
  float group_scale(int r, int64_t g) const { return scale[r * G + g]; }
  float group_sum(int r, int64_t g) const { return sum[r * G + g]; }
  int32_t group_qsum(int r, int64_t g) const { return qsum[r * G + g]; }
};

// Output block `nb` for R rows from r0: each group's weights are loaded (and unpacked) once and
// multiplied with every row's activations.
struct Int4Weights {
  const uint8_t* packed;

  template <int R, typename T>
  VNNI_TARGET void block(const QuantizedRows& x, T* out, int64_t nb, int64_t r0, int64_t K, int64_t N) const {
    const RowTile rows(x, r0, K);
    const int64_t G = rows.G;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* blk = packed + nb * G * kInt4GroupBytes;
    for (int64_t g = 0; g < G; ++g, blk += kInt4GroupBytes) {
      __m512i wq[8];
      for (int j = 0; j < 4; ++j) {
        const __m512i both = _mm512_loadu_si512(blk + 64 * j);
        wq[2 * j] = _mm512_and_si512(both, low4);
        wq[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(both, 4), low4);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kInt4QuantBytes)));
      const __m512 m =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kInt4QuantBytes + 32)));
      for (int r = 0; r < R; ++r) {
        const __m512i dot = group_dot(wq, rows.quants(r, g));
        const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(rows.group_scale(r, g)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
        acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(rows.group_sum(r, g)), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) store_lanes(acc[r], out + (r0 + r) * N + nb * kLanes);
  }
};

struct Int8Weights {
  const uint8_t* packed;
  const float* scale;  // [N]

  template <int R, typename T>
  VNNI_TARGET void block(const QuantizedRows& x, T* out, int64_t nb, int64_t r0, int64_t K, int64_t N) const {
    const RowTile rows(x, r0, K);
    const int64_t G = rows.G;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* blk = packed + nb * G * kInt8GroupBytes;
    for (int64_t g = 0; g < G; ++g, blk += kInt8GroupBytes) {
      __m512i wq[8];
      for (int c = 0; c < 8; ++c) wq[c] = _mm512_loadu_si512(blk + 64 * c);
      for (int r = 0; r < R; ++r) {
        // The weights were stored as q + 128: take back 128 * sum(xq).
        const __m512i dot = _mm512_sub_epi32(group_dot(wq, rows.quants(r, g)),
                                             _mm512_set1_epi32(128 * rows.group_qsum(r, g)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(rows.group_scale(r, g)), acc[r]);
      }
    }
    const __m512 s = _mm512_loadu_ps(scale + nb * kLanes);
    for (int r = 0; r < R; ++r) store_lanes(_mm512_mul_ps(acc[r], s), out + (r0 + r) * N + nb * kLanes);
  }
};

// x [M, K] through the weights' N outputs: quantize the rows, then threads split the output
// blocks; each runs all rows through its blocks, eight at a time, so a block's weights are read
// from memory once and stay in L1 for the rows after the first.
template <typename Weights>
at::Tensor run(const at::Tensor& x, const Weights& weights, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  auto xc = x.contiguous();
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  auto typed = [&](const auto* xp, auto* o) {
    const QuantizedRows rows = quantize_rows(xp, M, K);
    at::parallel_for(0, N / kLanes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nb = begin; nb < end; ++nb) {
        int64_t r = 0;
        for (; r + 8 <= M; r += 8) weights.template block<8>(rows, o, nb, r, K, N);
        if (r + 4 <= M) {
          weights.template block<4>(rows, o, nb, r, K, N);
          r += 4;
        }
        switch (M - r) {
          case 3: weights.template block<3>(rows, o, nb, r, K, N); break;
          case 2: weights.template block<2>(rows, o, nb, r, K, N); break;
          case 1: weights.template block<1>(rows, o, nb, r, K, N); break;
        }
      }
    });
  };
  switch (x.scalar_type()) {  // check_input admits these three
    case at::kFloat: typed(xc.data_ptr<float>(), out.data_ptr<float>()); break;
    case at::kBFloat16: typed(xc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>()); break;
    default: typed(xc.data_ptr<at::Half>(), out.data_ptr<at::Half>()); break;
  }
  return out;
}
#endif  // LLMMESH_VNNI

void check_input(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t group_bytes) {
  TORCH_CHECK(vnni_supported(), "the quantized kernels need a CPU with AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2, "x must be [rows, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const int64_t K = x.size(1);
  check_shape(N, K);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (N / kLanes) * (K / kGroup) * group_bytes,
              "packed weights do not match [", N, ", ", K, "]");
}

// The packed bytes of q [N, K] (integers, offset by `bias` into [0, 255]), 8 registers a group.
// Returns [N / 16, K / 32, 8, 16, 4] uint8; int4 packs pairs of its registers into nibbles.
at::Tensor registers(const at::Tensor& q, int64_t lo, int64_t hi, int64_t bias) {
  TORCH_CHECK(q.dim() == 2, "q must be [out_features, in_features]");
  const int64_t N = q.size(0), K = q.size(1);
  check_shape(N, K);
  auto qi = q.to(at::kInt);
  TORCH_CHECK(qi.min().item<int>() >= lo && qi.max().item<int>() <= hi, "quants must lie in [", lo, ", ", hi, "]");
  // [nb, lane, g, c, b] -> [nb, g, c, lane, b]
  return (qi + bias).to(at::kByte).view({N / kLanes, kLanes, K / kGroup, 8, 4}).permute({0, 2, 3, 1, 4}).contiguous();
}

}  // namespace

bool vnni_supported() {
#if defined(LLMMESH_VNNI)
  return avx512_vnni_supported();
#else
  return false;
#endif
}

// x [M, K] float32, bfloat16 or float16; packed from int4_pack_weight; returns [M, N] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  check_input(x, packed, N, kInt4GroupBytes);
#if defined(LLMMESH_VNNI)
  return run(x, Int4Weights{packed.data_ptr<uint8_t>()}, N);
#else
  return {};
#endif
}

// q [N, K] integers in [0, 15]; d, m [N, K / 32] (w = d * q + m). Returns the packed bytes.
at::Tensor int4_pack_weight(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  auto regs = registers(q, 0, 15, 0);  // [nb, G, 8, 16, 4]
  const int64_t blocks = regs.size(0), G = regs.size(1);
  TORCH_CHECK(d.sizes() == m.sizes() && d.size(0) == q.size(0) && d.size(1) == G,
              "d and m must be [out_features, in / 32]");
  auto pairs = regs.view({blocks, G, 4, 2, kLanes * 4});
  auto nibbles = pairs.select(3, 0).bitwise_or(pairs.select(3, 1).bitwise_left_shift(4));  // [nb, G, 4, 64]
  auto scales = [&](const at::Tensor& s) {  // [N, G] -> [nb, G, 16] float16, as bytes
    return s.to(at::kHalf).view({blocks, kLanes, G}).permute({0, 2, 1}).contiguous().view(at::kByte);
  };
  return at::cat({nibbles.reshape({blocks, G, kInt4QuantBytes}), scales(d), scales(m)}, 2).reshape({-1});
}

// x [M, K]; packed from int8_pack_weight; scale [N] float32 per output. Returns [M, N] in x's dtype.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t N) {
  check_input(x, packed, N, kInt8GroupBytes);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale must be float32 [out_features]");
#if defined(LLMMESH_VNNI)
  return run(x, Int8Weights{packed.data_ptr<uint8_t>(), scale.data_ptr<float>()}, N);
#else
  return {};
#endif
}

// q [N, K] integers in [-127, 127] (w = scale * q per output). Returns the packed bytes.
at::Tensor int8_pack_weight(const at::Tensor& q) { return registers(q, -127, 127, 128).reshape({-1}); }

}  // namespace llmmesh
