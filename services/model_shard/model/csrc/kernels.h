// The native kernels' entry points (one source file each), exposed to Python by bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace llmmesh {

// Decode attention over a paged KV cache (paged_attention.cpp).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale);

// Residual add and RMSNorm (rms_norm.cpp).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);

// RoPE of queries and keys, and the KV cache write (rope_cache.cpp).
std::tuple<at::Tensor, at::Tensor> rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos,
                                                  const at::Tensor& signed_sin, const at::Tensor& slots,
                                                  at::Tensor k_cache, at::Tensor v_cache, int64_t heads);

// SiLU(gate) * up of the MLP (silu_and_mul.cpp).
at::Tensor silu_and_mul(const at::Tensor& x);

// 4- and 8-bit weights x 8-bit activations (quantized_linear.cpp); vnni_supported: whether this
// build has them.
bool vnni_supported();
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N);
at::Tensor int4_pack_weight(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t N);
at::Tensor int8_pack_weight(const at::Tensor& q);

// bfloat16 and float32 linears with a fixed reduction order, batch-invariant (dense_linear.cpp); dense_supported:
// whether this CPU runs them (AVX-512), dense_uses_bf16_instructions: with AVX512-BF16.
bool dense_supported();
bool dense_uses_bf16_instructions();
at::Tensor dense_pack_weight(const at::Tensor& w);
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, bool float_out);

// Grammar bitmasks onto the constrained rows' logits, in place (token_bitmask.cpp).
void apply_token_bitmask(at::Tensor logits, const at::Tensor& rows, const at::Tensor& masks);

}  // namespace llmmesh
