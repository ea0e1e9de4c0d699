"""Rotary position embeddings and the RoPE scaling types checkpoints publish, as transformers
defines them (`modeling_rope_utils`): default, linear, llama3, yarn and longrope.

Every type here is a fixed table of frequencies: a key is rotated once, when it is written to the
paged KV cache, and must mean the same for every later query. Two types are not fixed in
transformers:
- dynamic NTK recomputes the frequencies from the current sequence length, so a cached key would
  have been rotated at another frequency than the one its later queries use. It is refused by name
  (vLLM serves a fixed-length variant whose answers differ from transformers' below that length).
- longrope switches from the short to the long factors once a sequence passes
  original_max_position_embeddings. Served with the short factors, and the context capped at
  original_max_position_embeddings, where transformers uses the same ones: exact up to the cap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class UnsupportedRope(ValueError):
    pass


def rope_type_of(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def check_rope(params: dict, where: str = "rope_scaling") -> None:
    """Refuse a RoPE type this module does not compute, naming it and listing the supported ones."""
    kind = rope_type_of(params)
    if kind == "dynamic":
        raise UnsupportedRope(f"{where}: RoPE type 'dynamic' (dynamic NTK) is not supported: it re-rotates keys "
                              f"as a sequence grows, which a paged KV cache cannot; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedRope(f"{where}: unsupported RoPE type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedRope(f"{where}: partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                              "(only whole-head rotation, 1.0)")


def context_cap(params: dict, max_positions: int) -> int:
    """The longest context served exactly with these parameters (see longrope above)."""
    if rope_type_of(params) == "longrope":
        return min(max_positions, params["original_max_position_embeddings"])
    return max_positions


def inverse_frequencies(params: dict, head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] float32, attention_factor: the scale of cos and sin) of a RoPE
    parameter dict (rope_theta, rope_type and the type's fields). max_positions: the config's
    max_position_embeddings, which yarn and longrope read when no factor is given."""
    check_rope(params)
    kind, base = rope_type_of(params), float(params.get("rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn(params, base, head_dim, max_positions)
    return _longrope(params, base, exponents, max_positions)


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high, old = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p: dict, base: float, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all))
                            if mscale and mscale_all else _yarn_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _longrope(p: dict, base: float, exponents: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(p["short_factor"], dtype=torch.float32)  # see the module's note
    return 1.0 / (short * base**exponents), attention_factor


class RotaryEmbedding(nn.Module):
    """Rotary positions, non-interleaved halves (HF layout). Looked up once per forward pass; each
    layer rotates its queries and keys together. inv_freq and attention_factor: a scaled RoPE (see
    inverse_frequencies); by default the plain one of `theta`."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0,
                 inv_freq: torch.Tensor | None = None, attention_factor: float = 1.0):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        half = head_dim // 2
        cos, sin = emb.cos() * attention_factor, emb.sin() * attention_factor
        self.register_buffer("cos", cos, persistent=False)
        # rotate_half(x) * sin == roll(x, half) * sin with its first half negated: one op fewer.
        self.register_buffer("signed_sin", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    @classmethod
    def from_parameters(cls, params: dict, head_dim: int, max_positions: int) -> "RotaryEmbedding":
        inv_freq, attention_factor = inverse_frequencies(params, head_dim, max_positions)
        return cls(head_dim, max_positions, inv_freq=inv_freq, attention_factor=attention_factor)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each token's position, [T, D] float32."""
        return self.cos[positions], self.signed_sin[positions]

    @staticmethod
    def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, heads, D] rotated in float32 and cast back."""
        cos, signed_sin = cos_sin[0].unsqueeze(1), cos_sin[1].unsqueeze(1)
        xf = x.float()
        return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * signed_sin).to(x.dtype)
