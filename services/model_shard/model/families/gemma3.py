"""Gemma 3 (text): Gemma 2 with per-head q/k RMSNorms (1 + weight), no soft-capping by default, five
sliding-window layers to one full one, and its own RoPE base for the sliding layers
(rope_parameters["sliding_attention"], or rope_local_base_freq in older configs)."""

from services.model_shard.model.config import SLIDING, rope_parameters
from services.model_shard.model.families import Family
from services.model_shard.model.families.gemma2 import GEMMA_FIELDS, gemma_fields


def fields(d: dict) -> dict:
    pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
    nested = SLIDING in (d.get("rope_parameters") or {})
    local = (rope_parameters(d, SLIDING) if nested
             else {"rope_type": "default", "rope_theta": float(d.get("rope_local_base_freq", 10000.0))})
    if not nested and "rope_theta" not in d:
        d = {**d, "rope_theta": 1_000_000.0}  # Gemma3TextConfig's global default
    rope = rope_parameters(d)
    return dict(gemma_fields(d, lambda i: (i + 1) % pattern != 0), qk_norm="head", local_rope=local, rope=rope,
                rope_theta=float(rope["rope_theta"]))


FAMILY = Family("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), fields, GEMMA_FIELDS)
