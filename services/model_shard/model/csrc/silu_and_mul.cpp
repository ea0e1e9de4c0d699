// SiLU(gate) * up over the MLP's fused gate/up projection, in one pass: three torch ops (a split,
// silu, a multiply) and an intermediate tensor fewer per layer. Rounding follows torch's path in
// the activation dtype: the SiLU is rounded to it, then the product.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "vec_math.h"

namespace llmmesh {
namespace {

template <typename T>
void silu_and_mul_kernel(const T* x, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * inter;
      const T* up = gate + inter;
      T* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        // exp(-|g|): a sigmoid without overflow on either side (0 where exp_nonpositive stops).
        const float e = g < -87.f ? 0.f : exp_nonpositive(-std::fabs(g));
        const T silu = static_cast<T>(g * ((g >= 0.f ? 1.f : e) / (1.f + e)));
        o[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
      }
    }
  });
}

}  // namespace

// x [T, 2 * I] (gate then up); returns [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [rows, 2 * intermediate]");
  auto xc = x.contiguous();
  const int64_t inter = x.size(1) / 2;
  auto out = at::empty({x.size(0), inter}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_kernel<scalar_t>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), inter);
  });
  return out;
}

}  // namespace llmmesh
