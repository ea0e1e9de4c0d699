// bfloat16 and float32 linear layers with a fixed reduction order: a row's outputs are the same numbers whatever
// the batch around it.
//
// torch's linears on CPU pick their blocking and kernel by the number of rows, and a row's sums then
// change with the batch: in bfloat16 (oneDNN) the MLP's down projection (1536 -> 576) at 64 and
// 256 rows even without AMX, and with AMX the LM head once a batch has 33 rows; in float32 (MKL)
// every shape between one row (a matrix-vector product) and two. A greedy answer then depends on what else was batched with it, and a
// resumed stream or a response-cache entry may no longer agree with a fresh answer. Here every
// output is one float32 accumulator that adds its inputs' products in input order, pair by pair,
// with the same instructions for any number of rows, any tiling and any thread split (threads only
// divide the outputs).
//
// Packed weights: blocks of 16 outputs (the last padded with zeros), and within a block one 64-byte
// register per step of the reduction: [N / 16][K / 2][16 outputs][2 inputs] bfloat16, or
// [N / 16][K][16 outputs] float32. In bfloat16 one AVX512-BF16 instruction multiplies a register with
// a broadcast pair of a row's inputs and adds both products to the 16 outputs' accumulators (on an
// AVX-512 CPU without BF16 the pair is widened to float32 and added by two FMAs, in the same order);
// in float32 one FMA per input.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "avx512.h"
#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace llmmesh {
namespace {

constexpr int64_t kLanes = 16;  // outputs per block
constexpr int64_t kBlocksPerTile = 2;  // output blocks a tile accumulates together
constexpr int kMaxRows = 8;  // rows a tile accumulates together

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")

// How one step of the reduction reads its inputs: a pair of bfloat16 inputs by one AVX512-BF16
// instruction, the same pair widened to float32 by two FMAs (AVX-512 without BF16), or one float32
// input by one FMA. Each step reads one 64-byte weight register per block of 16 outputs.
enum class Step { kDpbf16, kBf16Widened, kFloat };

template <Step kStep>
struct StepTraits {
  using Elem = std::conditional_t<kStep == Step::kFloat, float, uint16_t>;
  static constexpr int64_t kInputs = kStep == Step::kFloat ? 1 : 2;  // inputs a step consumes

  // acc += the products of the step's weights (one register) with the row's inputs at x.
  static __m512 madd(__m512 acc, __m512i w, const Elem* x) {
    if constexpr (kStep == Step::kFloat) {
      return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_set1_ps(*x), acc);
    } else {
      int32_t pair;
      std::memcpy(&pair, x, 4);
      if constexpr (kStep == Step::kDpbf16) {
        return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32(pair));
      } else {
        const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
        const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
        const uint32_t bits = static_cast<uint32_t>(pair), b0 = bits << 16, b1 = bits & 0xFFFF0000u;
        float x0, x1;
        std::memcpy(&x0, &b0, 4);
        std::memcpy(&x1, &b1, 4);
        return _mm512_fmadd_ps(w1, _mm512_set1_ps(x1), _mm512_fmadd_ps(w0, _mm512_set1_ps(x0), acc));
      }
    }
  }
};

template <typename Out>
inline void store_block(__m512 acc, Out* out, int64_t valid) {
  const __mmask16 mask = valid >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
  if constexpr (std::is_same_v<Out, float>) {
    _mm512_mask_storeu_ps(out, mask, acc);
  } else {
    _mm256_mask_storeu_epi16(out, mask, bf16_round16(acc));
  }
}

// R rows from `x` through kBlocksPerTile output blocks from block `nb` (fewer where N ends).
template <int R, Step kStep, typename Out>
void tile(const typename StepTraits<kStep>::Elem* x, const uint8_t* packed, Out* out, int64_t nb, int64_t blocks,
          int64_t K, int64_t N) {
  using Traits = StepTraits<kStep>;
  const int64_t steps = K / Traits::kInputs, nblk = std::min(kBlocksPerTile, blocks - nb);
  __m512 acc[R][kBlocksPerTile];
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < kBlocksPerTile; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint8_t* w0 = packed + nb * steps * 64;
  const uint8_t* w1 = w0 + (nblk > 1 ? steps * 64 : 0);  // a lone last block reads itself twice
  for (int64_t s = 0; s < steps; ++s) {
    const __m512i wa = _mm512_loadu_si512(w0 + s * 64), wb = _mm512_loadu_si512(w1 + s * 64);
    for (int r = 0; r < R; ++r) {
      const auto* xs = x + r * K + s * Traits::kInputs;
      acc[r][0] = Traits::madd(acc[r][0], wa, xs);
      acc[r][1] = Traits::madd(acc[r][1], wb, xs);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t n0 = (nb + j) * kLanes;
      store_block(acc[r][j], out + r * N + n0, N - n0);
    }
}

template <Step kStep, typename Out>
void rows_through_tile(const typename StepTraits<kStep>::Elem* x, const uint8_t* packed, Out* out, int64_t nb,
                       int64_t blocks, int64_t M, int64_t K, int64_t N) {
  int64_t r = 0;
  for (; r + kMaxRows <= M; r += kMaxRows) tile<kMaxRows, kStep>(x + r * K, packed, out + r * N, nb, blocks, K, N);
  const auto* xr = x + r * K;
  Out* o = out + r * N;
  switch (M - r) {
    case 7: tile<7, kStep>(xr, packed, o, nb, blocks, K, N); break;
    case 6: tile<6, kStep>(xr, packed, o, nb, blocks, K, N); break;
    case 5: tile<5, kStep>(xr, packed, o, nb, blocks, K, N); break;
    case 4: tile<4, kStep>(xr, packed, o, nb, blocks, K, N); break;
    case 3: tile<3, kStep>(xr, packed, o, nb, blocks, K, N); break;
    case 2: tile<2, kStep>(xr, packed, o, nb, blocks, K, N); break;
    case 1: tile<1, kStep>(xr, packed, o, nb, blocks, K, N); break;
  }
}

// Threads split the output tiles; each runs every row through its tiles, so a tile's weights are
// read from memory once and stay in cache for the rows after the first eight.
template <Step kStep, typename Out>
void dense_kernel(const typename StepTraits<kStep>::Elem* x, const uint8_t* packed, Out* out, int64_t M, int64_t K,
                  int64_t N) {
  const int64_t blocks = (N + kLanes - 1) / kLanes, tiles = (blocks + kBlocksPerTile - 1) / kBlocksPerTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rows_through_tile<kStep>(x, packed, out, t * kBlocksPerTile, blocks, M, K, N);
  });
}
#pragma GCC pop_options
#endif

}  // namespace

bool dense_supported() {
#if defined(__x86_64__)
  return avx512_supported();
#else
  return false;
#endif
}

bool dense_uses_bf16_instructions() {
#if defined(__x86_64__)
  return avx512_bf16_supported();
#else
  return false;
#endif
}

// w [N, K] bfloat16 (K even) or float32. Returns the packed weights in w's dtype, [ceil(N / 16) * 16 * K].
at::Tensor dense_pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat),
              "w must be bfloat16 or float32 [out_features, in_features]");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kLanes - 1) / kLanes;
  const int64_t inputs = w.scalar_type() == at::kFloat ? 1 : 2;  // per step (StepTraits)
  TORCH_CHECK(K % inputs == 0, "bfloat16 in_features must be even");
  auto padded = at::zeros({blocks * kLanes, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // [nb, lane, step, inputs] -> [nb, step, lane, inputs]
  return padded.view({blocks, kLanes, K / inputs, inputs}).permute({0, 2, 1, 3}).contiguous().view({-1});
}

// x [M, K] in the packed weights' dtype; packed from dense_pack_weight. Returns [M, N], float32 when
// float_out (the LM head's logits, unrounded), else in x's dtype.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, bool float_out) {
  TORCH_CHECK(dense_supported(), "the dense kernel needs a CPU with AVX-512");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == packed.scalar_type(), "x must be [rows, in_features] in w's dtype");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  const int64_t M = x.size(0), K = x.size(1), blocks = (N + kLanes - 1) / kLanes;
  TORCH_CHECK(packed.is_contiguous() && packed.numel() == blocks * kLanes * K,
              "packed weights do not match [", N, ", ", K, "]");
  auto xc = x.contiguous();
  auto out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : x.scalar_type()));
#if defined(__x86_64__)
  if (M == 0) return out;
  const auto* wp = static_cast<const uint8_t*>(packed.data_ptr());
  if (!bf16) {
    dense_kernel<Step::kFloat>(xc.data_ptr<float>(), wp, out.data_ptr<float>(), M, K, N);
    return out;
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  auto run = [&](auto* o) {
    if (avx512_bf16_supported()) dense_kernel<Step::kDpbf16>(xp, wp, o, M, K, N);
    else dense_kernel<Step::kBf16Widened>(xp, wp, o, M, K, N);
  };
  if (float_out) run(out.data_ptr<float>());
  else run(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
#endif
  return out;
}

}  // namespace llmmesh
