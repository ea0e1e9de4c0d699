"""Weight-only int8 quantization of the linear layers (per-output-channel symmetric scales).

On CPU it runs torch's fused int8 weight-packed matmul, which reads a quarter of float32's bytes;
pair it with bfloat16 activations (the kernel is slow with float32 input).
"""

from __future__ import annotations

import torch
from torch import nn

from services.model_shard.model.llama import LlamaForServing


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(act_dtype))
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.is_cpu:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:  # no fused kernel assumed elsewhere: dequantise on the fly
            y = torch.nn.functional.linear(flat, self.weight.to(flat.dtype)) * self.scales
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: LlamaForServing) -> LlamaForServing:
    """Replace every projection and the LM head with Int8Linear, in place."""
    act_dtype = model.embed_tokens.weight.dtype
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = Int8Linear(attn.qkv_proj.weight, act_dtype)
        attn.o_proj = Int8Linear(attn.o_proj.weight, act_dtype)
        mlp.gate_up_proj = Int8Linear(mlp.gate_up_proj.weight, act_dtype)
        mlp.down_proj = Int8Linear(mlp.down_proj.weight, act_dtype)
    # The head is the largest matrix of a small model; the embedding lookup keeps its float table.
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head_int8 = Int8Linear(head, act_dtype)
    model.lm_head = None
    return model
