"""Scoring text with the serving model: all-position logits and perplexity (quality checks)."""

from __future__ import annotations

import math

import torch

from services.model_shard.model.llama import AttentionMetadata, LlamaForServing, PrefillSpan


@torch.inference_mode()
def prompt_logits(model: LlamaForServing, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one prompt, through a scratch KV cache."""
    cfg, n = model.cfg, len(ids)
    dtype = model.dtype
    caches = [(torch.zeros(cfg.num_kv_heads, n, cfg.head_dim, dtype=dtype),
               torch.zeros(cfg.num_kv_heads, n, cfg.head_dim, dtype=dtype)) for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillSpan(0, n)])
    hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)
    return model.compute_logits(hidden)


def perplexity(model: LlamaForServing, ids: list[int]) -> float:
    logits = prompt_logits(model, ids)[:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())
