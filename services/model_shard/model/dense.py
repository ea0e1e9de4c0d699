"""Unquantized linears on the native batch-invariant kernel (csrc/dense_linear.cpp).

Greedy answers must not depend on what else is batched with a request: a resumed stream, a
response-cache entry and a seeded request beside others all rely on it. torch's CPU linears pick
their blocking by the number of rows, and a row's sums change with it (MKL's float32 between one
row and two; oneDNN's bfloat16 at some batch sizes, and with AMX for the LM head from 33 rows). The
native kernel sums each output over its inputs in one fixed order, and is faster than torch's on
AVX-512 CPUs at 1-512 rows (bench/kernels.py). Where it cannot run (no AVX-512, the kernels off, a
CUDA device) the layers stay torch's and batch invariance is not promised.

Which kernels are batch-invariant, and why:
- these dense linears, and the int8/int4 ones (csrc/quantized_linear.cpp): one accumulator per
  output, inputs in order, threads split only the outputs;
- paged attention: one query row at a time over its keys in order, for prompt and decode rows alike;
- RMSNorm, RoPE, SiLU: row by row;
- the sampler: per-row reductions over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from services.model_shard.model import native
from services.model_shard.model.llama import DirectModule, LlamaForServing

DENSE_DTYPES = (torch.bfloat16, torch.float32)


class DenseLinear(DirectModule):
    """y = x @ W^T (+ bias) on the native kernel. float_out: float32 results from bfloat16 inputs,
    unrounded (the LM head's logits)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, float_out: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.float_out = float_out
        self.register_buffer("weight", native.dense_pack_weight(weight.detach().contiguous()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out = native.dense_linear(rows, self.weight, self.out_features, self.float_out)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)


def dense_kernel_runs(dtype: torch.dtype) -> bool:
    """Whether the native dense kernel serves this dtype here."""
    return dtype in DENSE_DTYPES and native.dense_supported()


def use_dense_linears(model: LlamaForServing) -> bool:
    """Put every unquantized projection and the LM head of the model on the native kernel, in place.
    Returns whether it did (see dense_kernel_runs)."""
    if not dense_kernel_runs(model.dtype):
        return False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(module, name, DenseLinear(child.weight, child.bias))
    if model.norm is not None and model.lm_head_kernel is None:  # the last stage's head, unquantized
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        model.lm_head_kernel = DenseLinear(head, float_out=True)
        model.lm_head = None
    return True
