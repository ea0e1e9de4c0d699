"""Scoring text with the serving model: all-position logits and perplexity (quality checks)."""

from __future__ import annotations

import math

import torch

from services.model_shard.model.kv_format import new_kv_cache
from services.model_shard.model.llama import AttentionMetadata, LlamaForServing, PrefillSpan


@torch.inference_mode()
def prompt_logits(model: LlamaForServing, ids: list[int], kv_cache_dtype: str = "auto") -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one prompt, through a scratch KV cache (kv_format.py:
    "auto" the model's dtype, or "int8")."""
    cfg, n = model.cfg, len(ids)
    dtype, block_size = model.dtype, 16
    blocks = -(-n // block_size)  # laid out as the engine lays a prompt out, so the same kernels run
    kvh = model.num_kv_heads  # this partition's (tensor parallel)
    caches = [new_kv_cache(kvh, blocks * block_size, cfg.head_dim, dtype, kv_cache_dtype) for _ in model.layers]
    span = PrefillSpan(0, n, 0, list(range(blocks)), block_size)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[span])
    hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)
    return model.compute_logits(hidden)


def perplexity(model: LlamaForServing, ids: list[int], kv_cache_dtype: str = "auto") -> float:
    logits = prompt_logits(model, ids, kv_cache_dtype)[:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())
