"""A compact Llama for serving: one flat batch of tokens over a paged KV cache.

Every sequence in a step contributes its new tokens to one flat batch `[T]`; attention reads each
sequence's context from the KV cache through slot indices (`AttentionMetadata`), so sequences of any
length share one forward pass with no padding of the projections or the MLP.

The decoder is shared by every family (families/): a family's config fields switch on what it adds
(biases, q/k norms, norm placement, embedding scale, soft-capping, sliding windows, RoPE scaling).
The paged KV cache and its attention inputs are attention.py's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.model_shard.model import native
# The engine, executors and tests import these from here too (re-exported).
from services.model_shard.model.attention import (AttentionMetadata, DecodeBatch, PrefillSpan,  # noqa: F401
                                                  decode_attention, slots_of)
from services.model_shard.model.config import LlamaConfig
from services.model_shard.model.families import UnsupportedModel, family_named
from services.model_shard.model.kv_format import dequantize_rows, is_int8, quantize_rows
from services.model_shard.model.moe import SparseMoE
from services.model_shard.model.rope import RotaryEmbedding


@dataclass(frozen=True)
class Partition:
    """The part of the model one worker holds: a tensor-parallel slice (its share of the attention
    heads, KV heads and MLP columns) of the layers of one pipeline stage."""

    tp_rank: int = 0
    tp_size: int = 1
    first_layer: int = 0
    last_layer: int | None = None  # exclusive; None: through the last layer

    def layer_ids(self, cfg: LlamaConfig) -> range:
        return range(self.first_layer, cfg.num_layers if self.last_layer is None else self.last_layer)

    def is_first_stage(self) -> bool:
        return self.first_layer == 0

    def is_last_stage(self, cfg: LlamaConfig) -> bool:
        return self.last_layer is None or self.last_layer == cfg.num_layers


def check_parallel(cfg: LlamaConfig, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Refuse a split the model cannot take, saying which sizes would work."""
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ValueError("tensor and pipeline parallel sizes must be at least 1")
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP columns", cfg.intermediate_size)):
        if n % tensor_parallel:
            ok = [t for t in range(1, cfg.num_kv_heads + 1)
                  if cfg.num_heads % t == 0 and cfg.num_kv_heads % t == 0 and cfg.intermediate_size % t == 0]
            raise ValueError(f"tensor parallel size {tensor_parallel} does not divide the model's {n} {what} "
                             f"({cfg.num_heads} heads, {cfg.num_kv_heads} KV heads): use one of {ok}")
    if cfg.num_experts and cfg.moe_intermediate_size % tensor_parallel:
        raise ValueError(f"tensor parallel size {tensor_parallel} does not divide the experts' "
                         f"{cfg.moe_intermediate_size} columns")
    if tensor_parallel > 1 and cfg.qk_norm == "full":
        raise ValueError(f"{cfg.architecture}: its q/k norms span all heads, so tensor parallel is not supported "
                         "for it; use --tensor-parallel-size 1")
    if pipeline_parallel > cfg.num_layers:
        raise ValueError(f"pipeline parallel size {pipeline_parallel} exceeds the model's {cfg.num_layers} layers")


def stage_layers(num_layers: int, pipeline_parallel: int, stage: int) -> tuple[int, int]:
    """Contiguous layer range [first, last) of a pipeline stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pipeline_parallel)
    first = stage * base + min(stage, extra)
    return first, first + base + (1 if stage < extra else 0)


class DirectModule(nn.Module):
    """A module whose call goes straight to forward, past torch's hook dispatch: a decode step makes
    ~300 module calls, ~1 us each through nn.Module.__call__. The serving model registers no hooks."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class RMSNorm(DirectModule):
    """RMSNorm with the residual add before it fused in: forward(x, residual) returns
    (norm(x + residual), x + residual), the second being the residual stream that goes on."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False  # one native kernel instead of a dozen torch ops (see native.py)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.native:
            return native.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        # Normalise in float32 like the reference, cast back, then scale (HF's order of roundings).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype), x


class HeadNorm(DirectModule):
    """The q/k RMSNorm before RoPE over each head of x [T, heads, D] (dim = D: Qwen3, Gemma 3), or
    over all of a token's heads at once (dim = heads * D: OLMo 2). Stock torch: small, and applied
    to a strided view of the fused projection."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, self.weight.shape[0])
        out = self.weight * F.rms_norm(rows.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return out.view(x.shape)


def _bias(size: int, wanted: bool) -> nn.Parameter | None:
    # Added after its linear rather than inside it: a quantized linear (quant.py) has no bias.
    return nn.Parameter(torch.zeros(size)) if wanted else None


class Attention(DirectModule):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1, layer: int = 0):
        super().__init__()
        self.num_heads = cfg.num_heads // tp_size
        self.num_kv_heads = cfg.num_kv_heads // tp_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        # q, k and v fused into one matmul; the loader concatenates the checkpoint's three weights.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qkv_bias = _bias(self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_bias = _bias(cfg.hidden_size, cfg.o_bias)  # added once, after the ranks' sum
        per_head = cfg.qk_norm == "head"
        self.q_norm = HeadNorm(cfg.head_dim if per_head else self.q_size, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg.head_dim if per_head else self.kv_size, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = cfg.window_of(layer)
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        self.softcap = cfg.attn_softcap
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs (row-parallel o_proj)
        self.native = False  # RoPE, cache writes and decode attention by native kernels (native.py)

    def forward(self, x, cos_sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """cos_sin: RotaryEmbedding.lookup of the tokens' positions."""
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if self.q_norm is not None:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            qkv = torch.cat([self.q_norm(q.view(T, H, D)).view(T, -1), self.k_norm(k.view(T, KVH, D)).view(T, -1), v], -1)
        k_cache, v_cache = kv_cache  # [KVH, S, D], or int8 rows [KVH, S, D + 2] (kv_format.py)
        if self.native:
            q, k = native.rope_and_cache(qkv, *cos_sin, meta.slot_mapping, k_cache, v_cache, H)
        else:
            qk = RotaryEmbedding.rotate(qkv[:, : self.q_size + self.kv_size].view(T, H + KVH, D), cos_sin)
            q, k = qk[:, :H], qk[:, H:]
            ks, vs = k, self._values(qkv)
            if is_int8(k_cache):
                ks, vs = quantize_rows(ks), quantize_rows(vs)
            k_cache.index_copy_(1, meta.slot_mapping, ks.transpose(0, 1))
            v_cache.index_copy_(1, meta.slot_mapping, vs.transpose(0, 1))

        if meta.decode is not None and not meta.prefills:  # decode only: its tokens are the decode rows, in order
            return self._project(self._decode(q, k_cache, v_cache, meta.decode).view(T, self.q_size))
        v = self._values(qkv)
        out = torch.empty_like(q)  # [T, H, D]
        if meta.decode is not None:
            d = meta.decode
            out.index_copy_(0, d.token_index, self._decode(q.index_select(0, d.token_index), k_cache, v_cache, d))
        for span in meta.prefills:
            if self.native and span.block_table is not None and self._native_fits(span.context_start + span.end - span.start):
                # Every prompt token is a row of the paged kernel, as a decode row is: a token's
                # attention is the same numbers whether it came in a whole prompt, a chunk after
                # cached blocks, or a decode step, so greedy answers do not depend on the cache.
                out[span.start : span.end] = self._decode(q[span.start : span.end], k_cache, v_cache, span.paged)
                continue
            qp = q[span.start : span.end].transpose(0, 1)  # [H, L, D]
            if not span.context_start:
                kp = k[span.start : span.end].transpose(0, 1)  # [KVH, L, D]
                vp = v[span.start : span.end].transpose(0, 1)
                if is_int8(k_cache):  # the numbers the cache holds, as a later chunk will read them
                    kp, vp = (dequantize_rows(quantize_rows(x), q.dtype) for x in (kp, vp))
            else:
                kp = k_cache[:, span.kv_slots]  # [KVH, C, D]
                vp = v_cache[:, span.kv_slots]
                if is_int8(k_cache):
                    kp, vp = dequantize_rows(kp, q.dtype), dequantize_rows(vp, q.dtype)
            out[span.start : span.end] = self._prompt(qp, kp, vp, span).transpose(0, 1)
        return self._project(out.view(T, self.q_size))

    def _prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
        """Torch attention of a span's queries [H, L, D] over its context's keys [KVH, C, D]."""
        if self.softcap is None and self.window is None and not span.context_start:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=self.scale)
        mask = span.mask_within(self.window)  # [1, L, C]
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=self.scale)
        group = q.shape[0] // k.shape[0]
        scores = torch.matmul(q, k.repeat_interleave(group, 0).transpose(-1, -2)).float() * (self.scale / self.softcap)
        scores = (torch.tanh(scores) * self.softcap).masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v.repeat_interleave(group, 0))

    def _values(self, qkv: torch.Tensor) -> torch.Tensor:
        """The value heads of the fused projection, [T, KVH, D] (a view)."""
        return qkv[:, self.q_size + self.kv_size :].view(qkv.shape[0], self.num_kv_heads, self.head_dim)

    def _native_fits(self, longest_context: int) -> bool:
        """The native kernel attends to whole contexts with the plain scores: a sliding window that
        cuts a context, or soft-capping, take the torch path."""
        return self.softcap is None and (self.window is None or longest_context <= self.window)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeBatch) -> torch.Tensor:
        """Attention of each decode row's query [B, H, D] over its sequence's cached context."""
        if self.native and self._native_fits(int(d.context_lens.max()) if self.window else 0):
            return native.paged_decode_attention(q, k_cache, v_cache, d.block_tables, d.context_lens, d.block_size,
                                                 self.scale)
        # Stock torch: copy each sequence's blocks out into a padded [KVH, B, L, D], then matmuls.
        B, KVH, W = q.shape[0], self.num_kv_heads, k_cache.shape[-1]
        flat_blocks = d.block_tables.view(-1)
        kd = k_cache.view(KVH, -1, d.block_size, W).index_select(1, flat_blocks).view(KVH, B, -1, W)
        vd = v_cache.view(KVH, -1, d.block_size, W).index_select(1, flat_blocks).view(KVH, B, -1, W)
        if is_int8(k_cache):
            kd, vd = dequantize_rows(kd, q.dtype), dequantize_rows(vd, q.dtype)
        bias = d.bias if self.window is None else d.windowed_bias(self.window)
        return decode_attention(q, kd, vd, bias, self.scale, self.softcap)

    def _project(self, attn: torch.Tensor) -> torch.Tensor:
        out = self.o_proj(attn)
        out = out if self.reduce is None else self.reduce(out)
        return out if self.o_bias is None else out + self.o_bias


class MLP(DirectModule):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size // tp_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_bias = _bias(2 * self.intermediate_size, cfg.mlp_bias)
        self.down_bias = _bias(cfg.hidden_size, cfg.mlp_bias)  # added once, after the ranks' sum
        self.gelu = cfg.hidden_act == "gelu_tanh"
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs (row-parallel down_proj)
        self.native = False  # SiLU(gate) * up by a native kernel (native.py)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias
        if self.native and not self.gelu:
            hidden = native.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            hidden = (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up
        out = self.down_proj(hidden)
        out = out if self.reduce is None else self.reduce(out)
        return out if self.down_bias is None else out + self.down_bias


# Each norm form's RMSNorms, by checkpoint name (see DecoderLayer.forward).
LAYER_NORMS = {
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


class DecoderLayer(DirectModule):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1, layer: int = 0):
        super().__init__()
        self.form = cfg.norm_form
        for name in LAYER_NORMS[self.form]:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.self_attn = Attention(cfg, tp_size, layer)
        self.mlp = SparseMoE(cfg, tp_size) if cfg.is_moe(layer) else MLP(cfg, tp_size)
        self.local_rope = cfg.local_rope is not None and cfg.window_of(layer) is not None

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        """x: the previous layer's output; residual: the stream it adds to (None at a stage's first
        layer, whose x is the stream). Returns this layer's output and the stream, still unadded."""
        if self.form == "pre":  # Llama: x + attn(norm(x)), then + mlp(norm(...))
            h, residual = self.input_layernorm(x, residual)
            h, residual = self.post_attention_layernorm(self.self_attn(h, cos_sin, kv_cache, meta), residual)
            return self.mlp(h), residual
        if self.form == "sandwich":  # Gemma: x + norm(attn(norm(x))), then + norm(mlp(norm(...)))
            h, residual = self.input_layernorm(x, residual)
            h, _ = self.post_attention_layernorm(self.self_attn(h, cos_sin, kv_cache, meta))
            h, residual = self.pre_feedforward_layernorm(h, residual)
            return self.post_feedforward_layernorm(self.mlp(h))[0], residual
        # OLMo 2: x + norm(attn(x)), then + norm(mlp(...))
        stream = x if residual is None else x + residual
        h, _ = self.post_attention_layernorm(self.self_attn(stream, cos_sin, kv_cache, meta))
        stream = stream + h
        return self.post_feedforward_layernorm(self.mlp(stream))[0], stream


class LlamaForServing(nn.Module):
    """The whole model, or one worker's partition of it (see Partition): a pipeline stage holds its
    layers, the first the embedding, the last the final norm and LM head."""

    def __init__(self, cfg: LlamaConfig, partition: Partition = Partition()):
        super().__init__()
        self.cfg = cfg
        self.partition = partition
        first, last = partition.is_first_stage(), partition.is_last_stage(cfg)
        self.build_rope()
        # A tied LM head reads the embedding table, so the last stage keeps it too.
        needs_embedding = first or (last and cfg.tie_word_embeddings)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if needs_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, partition.tp_size, i) for i in partition.layer_ids(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = None if cfg.tie_word_embeddings or not last else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # The LM head as a module of its own, quantized (quant.py) or on the dense kernel (dense.py).
        self.lm_head_kernel: nn.Module | None = None

    def build_rope(self) -> None:
        """The RoPE tables: of full-attention layers, and of sliding ones where they differ (Gemma 3)."""
        cfg = self.cfg
        self.rope = RotaryEmbedding.from_parameters(cfg.rope or {"rope_theta": cfg.rope_theta}, cfg.head_dim,
                                                    cfg.max_position_embeddings)
        self.local_rope = (None if cfg.local_rope is None else
                           RotaryEmbedding.from_parameters(cfg.local_rope, cfg.head_dim, cfg.max_position_embeddings))

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].post_attention_layernorm.weight.dtype  # every norm form has it

    @property
    def num_kv_heads(self) -> int:
        """KV heads this partition holds per layer."""
        return self.cfg.num_kv_heads // self.partition.tp_size

    def use_native_kernels(self, enabled: bool = True) -> bool:
        """Run paged attention, the norms, RoPE with the cache writes and the MLP's activation on native
        kernels where they can be built; returns whether they are on. (Quantized linears pick their
        kernel when quantized, see load_model.)"""
        on = enabled and native.available()
        for module in self.modules():
            if isinstance(module, (Attention, RMSNorm, MLP)):
                module.native = on
        return on

    def set_tensor_parallel_reduce(self, reduce) -> None:
        """reduce(tensor) -> the sum over the tensor-parallel group (an all-reduce)."""
        for layer in self.layers:
            layer.self_attn.reduce = reduce
            layer.mlp.reduce = reduce

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; returns the final hidden states [T, hidden]. A later pipeline
        stage passes the previous stage's output as `hidden` instead of embedding input_ids."""
        if hidden is None:
            x = self.embed_tokens(input_ids)
            if self.cfg.embed_scale is not None:  # rounded to the model's dtype first, as transformers does
                x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        else:
            x = hidden
        cos_sin = self.rope.lookup(positions)
        local = cos_sin if self.local_rope is None else self.local_rope.lookup(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, local if layer.local_rope else cos_sin, kv_cache, meta)
        return x if residual is None else x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows that sample); returns float32 logits [N, vocab]."""
        hidden, _ = self.norm(hidden)
        if self.lm_head_kernel is not None:
            logits = self.lm_head_kernel(hidden).float()
        else:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hidden, weight).float()
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a HF state dict (the family's names, mapped onto `LlamaForCausalLM`'s), fusing q/k/v
        and gate/up, and keeping only this partition's layers and tensor-parallel slices."""
        cfg, part = self.cfg, self.partition
        tensors = family_named(cfg.family).weights(tensors, cfg)
        params = dict(self.named_parameters())
        r, tp, d = part.tp_rank, part.tp_size, cfg.head_dim
        hq, hk, inter = cfg.num_heads // tp * d, cfg.num_kv_heads // tp * d, cfg.intermediate_size // tp

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise UnsupportedModel(f"{cfg.architecture}: the checkpoint has no tensor {name!r}")
            return tensors[name]

        def put(name: str, value: torch.Tensor) -> None:
            param = params.pop(name)
            if param.shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
            param.copy_(value)

        def norm(name: str, src: str) -> None:  # Gemma's norms scale by 1 + weight: folded in here
            put(name, get(src).float() + cfg.norm_offset if cfg.norm_offset else get(src))

        def rows(t: torch.Tensor, size: int) -> torch.Tensor:  # column-parallel: this rank's outputs
            return t[r * size : (r + 1) * size]

        def cols(t: torch.Tensor, size: int) -> torch.Tensor:  # row-parallel: this rank's inputs
            return t[:, r * size : (r + 1) * size]

        def fused(prefix: str, names: tuple[str, ...], sizes: tuple[int, ...], suffix: str) -> torch.Tensor:
            return torch.cat([rows(get(f"{prefix}{n}.{suffix}"), s) for n, s in zip(names, sizes)])

        if self.embed_tokens is not None:
            put("embed_tokens.weight", get("model.embed_tokens.weight"))
        if self.norm is not None:
            norm("norm.weight", "model.norm.weight")
        if self.lm_head is not None:
            put("lm_head.weight", get("lm_head.weight"))
        qkv, gate_up = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
        for j, i in enumerate(part.layer_ids(cfg)):
            src, dst = f"model.layers.{i}.", f"layers.{j}."
            attn, mlp = src + "self_attn.", src + "mlp."
            put(dst + "self_attn.qkv_proj.weight", fused(attn, qkv, (hq, hk, hk), "weight"))
            put(dst + "self_attn.o_proj.weight", cols(get(attn + "o_proj.weight"), hq))
            if cfg.is_moe(i):
                put(dst + "mlp.gate.weight", get(mlp + "gate.weight"))
                size = cfg.moe_intermediate_size // tp
                for e in range(cfg.num_experts):
                    src_e, dst_e = f"{mlp}experts.{e}.", f"{dst}mlp.experts.{e}."
                    put(dst_e + "gate_up_proj.weight", fused(src_e, gate_up, (size, size), "weight"))
                    put(dst_e + "down_proj.weight", cols(get(src_e + "down_proj.weight"), size))
            else:
                put(dst + "mlp.gate_up_proj.weight", fused(mlp, gate_up, (inter, inter), "weight"))
                put(dst + "mlp.down_proj.weight", cols(get(mlp + "down_proj.weight"), inter))
            if cfg.qkv_bias:
                put(dst + "self_attn.qkv_bias", fused(attn, qkv, (hq, hk, hk), "bias"))
            if cfg.o_bias:
                put(dst + "self_attn.o_bias", get(attn + "o_proj.bias"))
            if cfg.mlp_bias:
                put(dst + "mlp.gate_up_bias", fused(mlp, gate_up, (inter, inter), "bias"))
                put(dst + "mlp.down_bias", get(mlp + "down_proj.bias"))
            if cfg.qk_norm:
                norm(dst + "self_attn.q_norm.weight", attn + "q_norm.weight")
                norm(dst + "self_attn.k_norm.weight", attn + "k_norm.weight")
            for name in LAYER_NORMS[cfg.norm_form]:
                norm(f"{dst}{name}.weight", f"{src}{name}.weight")
        if params:
            raise ValueError(f"checkpoint is missing {sorted(params)}")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None,
               partition: Partition = Partition(), native_kernels: bool = True) -> LlamaForServing:
    """Build the serving model (or one worker's partition of it) from a folder with config.json and
    *.safetensors. quantization: None, "int8" or "int4" (see quant.py). native_kernels: use the
    native kernels where they can be built (see native.py)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg = LlamaConfig.from_dir(model_dir)
    if partition.tp_size > 1:
        check_parallel(cfg, partition.tp_size, 1)
    with torch.device("meta"):
        model = LlamaForServing(cfg, partition)
    model = model.to_empty(device="cpu")
    # Buffers built on meta are empty: rebuild the RoPE tables for real.
    model.build_rope()
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    model.load_weights(tensors)
    model = model.to(dtype).eval()
    # Back to float32 for the rotation; the tables were rounded through the model dtype once, as
    # HF's bf16 cos/sin are.
    model.rope.float()
    if model.local_rope is not None:
        model.local_rope.float()
    if quantization in ("int8", "int4") and cfg.num_experts:
        raise UnsupportedModel(f"{cfg.architecture}: {quantization} quantization of experts is not implemented; "
                               "serve it with --quantization none")
    if quantization in ("int8", "int4"):
        from services.model_shard.model.quant import quantize

        quantize(model, quantization, native_kernel=native_kernels)
    elif quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r}; expected int8 or int4")
    if native_kernels:
        from services.model_shard.model.dense import use_dense_linears

        use_dense_linears(model)  # what quantize left unquantized, on the batch-invariant kernel
    model.use_native_kernels(native_kernels)
    return model


def weights_fingerprint(model_dir: str | Path) -> str:
    """A short id of a model's weights that equal copies share on any machine: its config and, per
    safetensors file, the size and the first and last MiB (the header names every tensor; the tail
    differs between fine-tunes). Keys shared KV blocks, which are only valid for identical weights."""
    h = hashlib.blake2b(digest_size=6)
    model_dir = Path(model_dir)
    h.update((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()
