// The int8 KV cache's row format (model/kv_format.py says why this one): each cached key or value
// row of a (token, KV head) is head_dim int8 values, then the row's scale as bfloat16, so a row is
// head_dim + 2 bytes and its scale is read with it. value = q * scale, scale = absmax / 127, q in
// [-127, 127] rounded half to even, as torch.round rounds: the torch path writes the same bytes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace llmmesh {

constexpr int64_t kInt8ScaleBytes = 2;

template <typename T>
inline void quantize_kv_row(const T* x, int8_t* dst, int64_t D) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::abs(static_cast<float>(x[i])));
  const c10::BFloat16 scale(amax / 127.f);
  const float s = static_cast<float>(scale);
  for (int64_t i = 0; i < D; ++i) {
    const float r = s == 0.f ? 0.f : std::nearbyint(static_cast<float>(x[i]) / s);
    dst[i] = static_cast<int8_t>(std::clamp(r, -127.f, 127.f));
  }
  std::memcpy(dst + D, &scale, kInt8ScaleBytes);
}

inline float kv_row_scale(const int8_t* row, int64_t D) {
  c10::BFloat16 scale;
  std::memcpy(&scale, row + D, kInt8ScaleBytes);
  return static_cast<float>(scale);
}

}  // namespace llmmesh
