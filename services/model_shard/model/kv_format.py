"""How the paged KV cache stores keys and values: at the model's dtype, or as int8 rows.

An int8 cache holds, per layer, k and v tensors int8 [KVH, slots, D + 2]: each (token, KV head) row
is D int8 values then its scale as bfloat16 (csrc/kv_int8.h writes the same bytes). Why this choice:
- Per (token, KV head) rather than llama.cpp's groups of 32: a row is written once, when its token
  is, so its scale never changes, and one scale per row keeps the kernel's inner loop the float one
  (the scale applied once per score and once per probability). Measured on SmolLM2-135M's attention
  inputs (a Chinese prompt, 10 layers' caches): groups of 32 cut the attention output's RMS error by
  ~25 % but cost 68 bytes a row (1.88x bfloat16's tokens, not 1.94x). Most of the error is the
  keys' (quantized values alone give a third of its RMS or less): a few RoPE'd channels of large
  magnitude set a row's scale, in either half of it, as RoPE pairs channel i with i + D/2.
- Symmetric (absmax / 127): no zero point for the kernel to subtract.
- The scale as bfloat16, beside its row: a row is 66 bytes where bfloat16's is 128 (1.94x the
  tokens in the same memory; a float32 scale would make it 1.88x), and the kernel reads the scale
  with the row it scales. Its 8-bit mantissa rounds the scale by at most 0.2 %, which moves the
  row's largest value by a quarter of a step, less than the int8 rounding's half step.
- Blocks travel through the cache service as these bytes; the layout names the format (kv_layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8")
SCALE_BYTES = 2  # the bfloat16 scale after an int8 row


@dataclass(frozen=True)
class KvChoice:
    value: str  # "bfloat16" | "float32" | "float16" | "int8": how rows are stored
    reason: str


def resolve_kv_cache_dtype(requested: str, model_dtype: str) -> KvChoice:
    """requested: one of KV_CACHE_DTYPES. A float cache is stored at the model's dtype (the kernels
    write and read rows of the activations' dtype), so another float dtype is refused."""
    if requested not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {requested!r}; expected one of {', '.join(KV_CACHE_DTYPES)}")
    if requested == "auto":
        # Not int8: with bfloat16 weights it stays within 1 % of bfloat16 KV's perplexity (tests/test_kv_int8.py),
        # but with the int4 weights this CPU serves by default a Chinese text's perplexity rose 3.5 %.
        return KvChoice(model_dtype, "auto: the model's dtype; --kv-cache-dtype int8 stores 1.94x the tokens in "
                                     "the same memory, at a small cost in quality (model/kv_format.py)")
    if requested == "int8":
        return KvChoice("int8", "asked for: int8 rows with a bfloat16 scale per token and KV head")
    if requested != model_dtype:
        raise ValueError(f"--kv-cache-dtype {requested} with --dtype {model_dtype}: a float KV cache is stored at the "
                         f"model's dtype; use auto ({model_dtype}) or int8")
    return KvChoice(requested, "asked for")


def is_int8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def row_bytes(head_dim: int, model_dtype: torch.dtype, kv_dtype: str) -> int:
    """Bytes of one cached key (or value) row of one token and KV head."""
    if kv_dtype == "int8":
        return head_dim + SCALE_BYTES
    return head_dim * torch.finfo(model_dtype).bits // 8


def new_kv_cache(num_kv_heads: int, num_slots: int, head_dim: int, model_dtype: torch.dtype,
                 kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (k, v) cache, zeroed."""
    if kv_dtype == "int8":
        shape, dtype = (num_kv_heads, num_slots, head_dim + SCALE_BYTES), torch.int8
    else:
        shape, dtype = (num_kv_heads, num_slots, head_dim), model_dtype
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (float) -> int8 [..., D + 2]: the bytes csrc/kv_int8.h writes for the same rows."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127).to(torch.bfloat16)
    s = scale.float()
    q = torch.where(s == 0, 0.0, torch.round(xf / s)).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D + 2] -> [..., D] in dtype (q * scale in float32, then rounded once)."""
    d = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.bfloat16).float()  # [..., 1]
    return (rows[..., :d].float() * scale).to(dtype)
