"""Qwen3-MoE: Qwen3 with a sparse mixture-of-experts MLP (moe.py) in every decoder_sparse_step-th
layer not in mlp_only_layers: num_experts experts of moe_intermediate_size, the top
num_experts_per_tok per token, renormalised with norm_topk_prob."""

from services.model_shard.model.families import Family
from services.model_shard.model.families.qwen3 import FAMILY as QWEN3


def fields(d: dict) -> dict:
    step, n = d.get("decoder_sparse_step") or 1, d["num_hidden_layers"]
    dense = tuple(i for i in range(n) if i in (d.get("mlp_only_layers") or ()) or (i + 1) % step)
    return dict(QWEN3.fields(d), num_experts=d.get("num_experts") or d["num_local_experts"], experts_per_token=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"], norm_topk_prob=bool(d.get("norm_topk_prob")),
                dense_layers=dense)


FAMILY = Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), fields, QWEN3.handles | {"num_experts", "num_local_experts"})
