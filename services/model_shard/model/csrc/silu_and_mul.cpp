// SiLU(gate) * up over the MLP's fused gate/up projection, in one pass: three torch ops (a split,
// silu, a multiply) and an intermediate tensor fewer per layer. Rounding follows torch's path in
// the activation dtype: the SiLU is rounded to it, then the product.
//
// The pass is AVX-512 (float32 and bfloat16), compiled for it whatever the build's -march and run
// where the CPU has it; elsewhere, and for other dtypes, the same three ATen ops run from here.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "avx512.h"
#include "kernels.h"

namespace llmmesh {
namespace {

#if defined(__x86_64__)
// exp(x) for x <= 0, Cephes' expf polynomial (as vec_math.h's exp_nonpositive), 16 lanes.
LLMMESH_AVX512 inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
}

// SiLU(g) = g * sigmoid(g), from e = exp(-|g|) so that neither side overflows (0 below exp's range).
LLMMESH_AVX512 inline __m512 silu16(__m512 g) {
  __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_set1_ps(-87.f), _CMP_LT_OQ), e, _mm512_setzero_ps());
  const __mmask16 nonnegative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 num = _mm512_mask_blend_ps(nonnegative, e, _mm512_set1_ps(1.f));
  return _mm512_mul_ps(g, _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
}

// One row: n outputs from n gates and n ups (n a multiple of 16).
LLMMESH_AVX512 void silu_and_mul_row(const c10::BFloat16* gate, const c10::BFloat16* up, c10::BFloat16* out,
                                    int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 g = load16(gate + i), u = load16(up + i);
    const __m512 s = bf16_widen16(bf16_round16(silu16(g)));  // torch rounds the SiLU to bfloat16 first
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bf16_round16(_mm512_mul_ps(s, u)));
  }
}

LLMMESH_AVX512 void silu_and_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_mul_ps(silu16(load16(gate + i)), load16(up + i)));
}

template <typename T>
void silu_and_mul_avx512(const T* x, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      silu_and_mul_row(x + r * 2 * inter, x + r * 2 * inter + inter, out + r * inter, inter);
  });
}
#endif

}  // namespace

// x [T, 2 * I] (gate then up); returns [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [rows, 2 * intermediate]");
  const int64_t inter = x.size(1) / 2;
#if defined(__x86_64__)
  const bool vector_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (vector_dtype && inter % 16 == 0 && avx512_supported()) {
    auto xc = x.contiguous();
    auto out = at::empty({x.size(0), inter}, x.options());
    if (x.scalar_type() == at::kFloat)
      silu_and_mul_avx512(xc.data_ptr<float>(), out.data_ptr<float>(), x.size(0), inter);
    else
      silu_and_mul_avx512(xc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), x.size(0), inter);
    return out;
  }
#endif
  return at::silu(x.narrow(1, 0, inter)) * x.narrow(1, inter, inter);
}

}  // namespace llmmesh
