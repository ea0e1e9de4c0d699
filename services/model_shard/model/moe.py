"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top-k experts,
and each expert runs once per step on all the tokens routed to it (a loop over the experts that
were hit, none over tokens). Under tensor parallel every rank holds its slice of every expert's
columns, and the ranks' partial sums are reduced once, after the experts' outputs are added up.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn


class SparseMoE(nn.Module):
    def __init__(self, cfg, tp_size: int = 1):
        from services.model_shard.model.llama import MLP  # the experts are the dense MLP, smaller

        super().__init__()
        self.top_k, self.normalize = cfg.experts_per_token, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router, never split
        expert_cfg = replace(cfg, intermediate_size=cfg.moe_intermediate_size, mlp_bias=False)
        self.experts = nn.ModuleList(MLP(expert_cfg, tp_size) for _ in range(cfg.num_experts))
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs, once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        probs = self.gate(x).float().softmax(-1)  # [T, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # the (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens, picked = order // self.top_k, weights.flatten()[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                rows = tokens[start : start + n]
                y = expert(x.index_select(0, rows)).float() * picked[start : start + n, None]
                out.index_add_(0, rows, y.to(x.dtype))
                start += n
        return out if self.reduce is None else self.reduce(out)
