// Scalar maths written so that the compiler vectorizes the loops that use it.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace llmmesh {

// exp for x <= 0 (a softmax after subtracting the max, a sigmoid of -|x|), Cephes' expf
// polynomial: relative error ~1e-7, and unlike std::exp it vectorizes. Below -87 it returns
// ~1e-38 instead of 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
}

}  // namespace llmmesh
