// Residual add and RMSNorm in one pass over each row.
//
// On CPU, torch runs RMSNorm as five elementwise/reduction ops plus the casts and the residual
// add: a dozen dispatches per norm, 61 norms per token. Rounding follows the reference model
// (HF Llama): the sum is rounded to the activation dtype, normalised in float32, rounded again,
// then scaled by the weight.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <cmath>
#include <tuple>

namespace llmmesh {
namespace {

template <typename T>
void add_rms_norm_kernel(const T* x, const T* residual, const T* weight, T* out, T* sum, int64_t rows,
                         int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      T* sr = sum + r * hidden;
      // Summed in double: the scale comes out as float32 rounds the exact value, in any order.
      double sumsq = 0.0;
      if (residual != nullptr) {
        const T* rr = residual + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
          const T s = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          sr[i] = s;
          sumsq += static_cast<double>(s) * static_cast<double>(s);
        }
      } else {
        for (int64_t i = 0; i < hidden; ++i) {
          sr[i] = xr[i];
          sumsq += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
        }
      }
      const float inv = static_cast<float>(1.0 / std::sqrt(sumsq / static_cast<double>(hidden) + eps));
      T* o = out + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        const T normed = static_cast<T>(static_cast<float>(sr[i]) * inv);
        o[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
      }
    }
  });
}

}  // namespace

// x [rows, hidden]; residual: the same shape, or None; weight [hidden].
// Returns (rms_norm(x + residual) * weight, x + residual).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x [rows, hidden], weight [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  auto xc = x.contiguous();
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x");
    rc = residual->contiguous();
  }
  auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  auto sum = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_kernel<scalar_t>(xc.data_ptr<scalar_t>(), rc.defined() ? rc.data_ptr<scalar_t>() : nullptr,
                                  wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(),
                                  xc.size(0), xc.size(1), static_cast<float>(eps));
  });
  return {out, sum};
}

}  // namespace llmmesh
