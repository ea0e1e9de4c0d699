"""Quantization of the linear layers: int8 (per-output-channel symmetric scales) or int4
(asymmetric, groups of 32: the layout of the Q4_1 GGUF the model ships as).

One stream is memory-bound: each token reads every weight once, and int8 and int4 read a quarter
and an eighth of float32's bytes. On a CPU with AVX-512 VNNI the native kernels
(csrc/quantized_linear.cpp) run them on llama.cpp's scheme: activations quantized to int8 per
group of 32 and integer dot products, 2-2.8x torch's int8/int4 weight-packed matmuls at one row
and at 256. Elsewhere those torch kernels run, with bfloat16 activations (they are slow with float32).
"""

from __future__ import annotations

import torch
from torch import nn

from services.model_shard.model import native
from services.model_shard.model.llama import DirectModule, LlamaForServing


class QuantizedLinear(DirectModule):
    """What Int8Linear and Int4Linear share: the shape, whether the native kernel can take it (16 |
    out_features, 32 | in_features, a CPU with AVX-512 VNNI), and a forward over 2-D rows
    (`matmul`), which the model's [tokens, features] inputs already are."""

    def __init__(self, out_features: int, in_features: int, native_kernel: bool):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.native = native_kernel and out_features % 16 == 0 and in_features % 32 == 0 and native.vnni_supported()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.matmul(x)
        return self.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """8-bit weights, symmetric per output channel (w = scale * q, q in [-127, 127]).

    native_kernel: the native W8A8 kernel where it can take the layer (QuantizedLinear), which also
    quantizes the activations to int8 per group of 32 (as llama.cpp does). Otherwise torch's int8
    weight-packed matmul, with activations as they are."""

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype, native_kernel: bool = False):
        super().__init__(*weight.shape, native_kernel)
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        if self.native:
            self.register_buffer("weight", native.int8_pack_weight(q))
            self.register_buffer("scales", scales)  # float32: the kernel scales its float32 sums
        else:
            self.register_buffer("weight", q)
            self.register_buffer("scales", scales.to(act_dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native.int8_linear(x, self.weight, self.scales, self.out_features)
        if x.is_cpu:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        # no fused kernel assumed elsewhere: dequantise on the fly
        return torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scales


def quantize(model: LlamaForServing, method: str, native_kernel: bool = False) -> LlamaForServing:
    """Replace every projection and the LM head with quantized linears, in place.
    method: "int8" (per output channel) or "int4" (groups of 32). native_kernel: run them on the
    native W8A8/W4A8 kernels where the CPU has them (the weights are packed for one kernel or the
    other, once)."""
    linear = {"int8": Int8Linear, "int4": Int4Linear}[method]

    def make(weight: torch.Tensor, act_dtype: torch.dtype) -> nn.Module:
        return linear(weight, act_dtype, native_kernel=native_kernel)

    act_dtype = model.dtype
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = make(attn.qkv_proj.weight, act_dtype)
        attn.o_proj = make(attn.o_proj.weight, act_dtype)
        mlp.gate_up_proj = make(mlp.gate_up_proj.weight, act_dtype)
        mlp.down_proj = make(mlp.down_proj.weight, act_dtype)
    # The head is the largest matrix of a small model, and it picks every token: int8 at most (int4
    # there flips greedy answers). The embedding lookup keeps its float table.
    if model.norm is not None:  # the last pipeline stage holds the head
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        model.lm_head_kernel = Int8Linear(head, act_dtype, native_kernel=native_kernel)
        model.lm_head = None
    return model


class Int4Linear(QuantizedLinear):
    """4-bit weights, asymmetric per group of `group_size` input channels (w = scale * q + min, q in
    [0, 15]: the layout of the Q4_1 GGUF the model ships as).

    native_kernel: the native W4A8 kernel where it can take the layer (QuantizedLinear, and groups
    of 32), which also quantizes the activations to int8 per group of 32 (as llama.cpp does).
    Otherwise torch's fused int4 weight-packed matmul, with activations as they are."""

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype, group_size: int = 32, native_kernel: bool = False):
        super().__init__(*weight.shape, native_kernel and group_size == 32)
        w = weight.detach().float()
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
        groups = w.view(n, k // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, 15).to(torch.int32).view(n, k)
        if self.native:
            self.register_buffer("weight", native.int4_pack_weight(q, scale, low))
        else:
            # The torch kernel computes w = (q - 8) * scale + zero.
            zero = low + 8 * scale
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_zeros", scales_zeros.to(act_dtype))  # [k / group, n, 2]
        self.group_size = group_size

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native.int4_linear(x, self.weight, self.out_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_zeros)
