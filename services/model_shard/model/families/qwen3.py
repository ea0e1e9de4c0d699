"""Qwen3: Qwen2 without the q/k/v biases (attention_bias sets all four) and with an RMSNorm over each
query and key head before RoPE (q_norm, k_norm)."""

from services.model_shard.model.families import Family
from services.model_shard.model.families.qwen2 import SLIDING_FIELDS, sliding


def fields(d: dict) -> dict:
    attention_bias = bool(d.get("attention_bias"))
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm="head", **sliding(d))


FAMILY = Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), fields, SLIDING_FIELDS | {"attention_bias"})
