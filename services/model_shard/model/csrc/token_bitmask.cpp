// A grammar's next-token bitmasks applied to the logits of the constrained rows, in place: each
// disallowed token's logit becomes -inf. One pass over the mask words; a word whose 32 tokens are
// all allowed (inside a JSON string, most are) costs a compare. Torch ops would unpack every bit
// into a [rows, vocab] tensor first, several milliseconds per step at 16 rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kernels.h"

namespace llmmesh {

void apply_token_bitmask(at::Tensor logits, const at::Tensor& rows, const at::Tensor& masks) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous float32 [B, V] tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be int64 [R]");
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == at::kInt && masks.is_contiguous() &&
                  masks.size(0) == rows.size(0),
              "masks must be a contiguous int32 [R, words] tensor");
  const int64_t B = logits.size(0), V = logits.size(1), W = masks.size(1), R = rows.size(0);
  const int64_t* row_index = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(0 <= row_index[i] && row_index[i] < B, "row out of range");
  float* out = logits.data_ptr<float>();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  constexpr float kBlocked = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = out + row_index[i] * V;
      const uint32_t* mask = words + i * W;
      const int64_t covered = std::min(V, W * 32);
      for (int64_t w = 0; w * 32 < covered; ++w) {
        const uint32_t bits = mask[w];
        if (bits == 0xFFFFFFFFu) continue;
        const int64_t base = w * 32, n = std::min<int64_t>(32, covered - base);
        for (int64_t j = 0; j < n; ++j)
          if (!((bits >> j) & 1u)) row[base + j] = kBlocked;
      }
      std::fill(row + covered, row + V, kBlocked);  // tokens past the mask: never allowed
    }
  });
}

}  // namespace llmmesh
