"""Mixtral: Mistral with a sparse mixture-of-experts MLP (moe.py): num_local_experts experts of
intermediate_size, the top num_experts_per_tok per token, their router probabilities renormalised.
Checkpoint names block_sparse_moe.{gate, experts.N.w1/w3/w2} map onto the router and gate/up/down."""

import re

import torch

from services.model_shard.model.families import Family

RENAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def fields(d: dict) -> dict:
    return dict(sliding_window=d.get("sliding_window") or None, num_experts=d["num_local_experts"],
                experts_per_token=d["num_experts_per_tok"], moe_intermediate_size=d["intermediate_size"])


def _rename(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: f"{m[1]}{RENAMES[m[2]]}.", name)


def weights(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    return {_rename(name): t for name, t in tensors.items()}


FAMILY = Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), fields,
                frozenset({"sliding_window", "num_local_experts"}), weights)
