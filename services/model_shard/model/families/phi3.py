"""Phi-3 and Phi-3.5 (mini, medium): Llama with q/k/v fused in one checkpoint tensor (qkv_proj) and
gate/up in another (gate_up_proj), split here into Llama's names; longrope RoPE scaling
(model/rope.py); a sliding window over every layer where the config sets one."""

import torch

from services.model_shard.model.families import Family


def fields(d: dict) -> dict:
    return dict(sliding_window=d.get("sliding_window") or None)


def weights(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, t in tensors.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            out.update(zip((prefix + p for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
                           t.split([q, kv, kv])))
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name[: -len("gate_up_proj.weight")]
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = t.chunk(2)
        else:
            out[name] = t
    return out


FAMILY = Family("phi3", ("Phi3ForCausalLM",), ("phi3",), fields, frozenset({"sliding_window"}), weights)
