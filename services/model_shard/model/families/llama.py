"""Llama 1, 2 and 3.x: the shared decoder as it is; Llama 3's RoPE scaling (rope_type llama3) is
model/rope.py's. attention_bias puts biases on q/k/v/o, mlp_bias on gate/up/down."""

from services.model_shard.model.families import Family


def fields(d: dict) -> dict:
    attention_bias = bool(d.get("attention_bias"))
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(d.get("mlp_bias")))


FAMILY = Family("llama", ("LlamaForCausalLM",), ("llama",), fields, frozenset({"attention_bias", "mlp_bias"}))
