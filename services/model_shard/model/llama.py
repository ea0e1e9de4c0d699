"""A compact Llama for serving: one flat batch of tokens over a paged KV cache.

Every sequence in a step contributes its new tokens to one flat batch `[T]`; attention reads each
sequence's context from the KV cache through slot indices (`AttentionMetadata`), so sequences of any
length share one forward pass with no padding of the projections or the MLP.

The KV cache of a layer is a pair of tensors `[num_kv_heads, num_slots, head_dim]`, a slot being
`block_id * block_size + offset`: tokens are written by slot, and decode reads whole blocks
through each sequence's block table (a block is a contiguous run of slots).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.model_shard.model import native


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; only 'default' is implemented")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads", num_heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "LlamaConfig":
        return cls.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))


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
    if pipeline_parallel > cfg.num_layers:
        raise ValueError(f"pipeline parallel size {pipeline_parallel} exceeds the model's {cfg.num_layers} layers")


def stage_layers(num_layers: int, pipeline_parallel: int, stage: int) -> tuple[int, int]:
    """Contiguous layer range [first, last) of a pipeline stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pipeline_parallel)
    first = stage * base + min(stage, extra)
    return first, first + base + (1 if stage < extra else 0)


@dataclass
class DecodeBatch:
    """Sequences that add exactly one token this step, attended in one padded call."""

    token_index: torch.Tensor  # [B] positions of their tokens in the flat batch
    block_tables: torch.Tensor  # [B, N] blocks holding each context, padded with block 0
    context_lens: torch.Tensor  # [B] keys each sequence attends to (its new token's included)
    block_size: int

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """float32 [B, N * block_size]: 0 where the key is real context, -inf past it (the torch path's mask)."""
        keys = torch.arange(self.block_tables.shape[1] * self.block_size).unsqueeze(0)
        return torch.zeros(keys.shape[1]).masked_fill(keys >= self.context_lens.unsqueeze(1), float("-inf"))

    @classmethod
    def build(cls, token_index: list[int], block_tables: list[list[int]], lengths: list[int],
              block_size: int) -> "DecodeBatch":
        """block_tables: each sequence's blocks, at least enough for its context length."""
        width = -(-max(lengths) // block_size)
        tables = torch.tensor([b[:width] + [0] * (width - len(b[:width])) for b in block_tables])
        return cls(torch.tensor(token_index), tables, torch.tensor(lengths), block_size)


def slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slots of a sequence's positions, given its blocks."""
    return block_table[positions // block_size] * block_size + positions % block_size


@dataclass
class PrefillSpan:
    """A sequence that adds several tokens: a whole prompt, or a chunk that continues a context whose
    earlier keys are in the cache (a later chunk, or a prompt after reused prefix blocks)."""

    start: int  # its tokens are flat[start:end]
    end: int
    context_start: int = 0  # the position of its first token; 0: the span is the whole context
    block_table: list[int] | None = None  # the sequence's blocks (needed with context_start > 0)
    block_size: int = 0

    @functools.cached_property
    def kv_slots(self) -> torch.Tensor:
        """[C] the slots of the whole context, cached keys and the span's own (torch path)."""
        positions = torch.arange(self.context_start + self.end - self.start)
        return slots_of(torch.tensor(self.block_table), positions, self.block_size)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[1, end - start, C]: each token sees the context up to itself (torch path)."""
        positions = torch.arange(self.context_start, self.context_start + self.end - self.start)
        return (torch.arange(len(self.kv_slots)).unsqueeze(0) <= positions.unsqueeze(1)).unsqueeze(0)

    @functools.cached_property
    def paged(self) -> DecodeBatch:
        """The span's tokens as rows of paged decode attention, each over the context up to itself:
        the native kernel reads the cached keys where they lie instead of a gathered copy."""
        n = self.end - self.start
        lengths = torch.arange(self.context_start + 1, self.context_start + n + 1)
        width = -(-(self.context_start + n) // self.block_size)
        table = torch.tensor(self.block_table[:width]).expand(n, width)
        return DecodeBatch(torch.arange(self.start, self.end), table, lengths, self.block_size)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: DecodeBatch | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)


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


class RotaryEmbedding(nn.Module):
    """Rotary positions, non-interleaved halves (HF layout). Looked up once per forward pass; each
    layer rotates its queries and keys together."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        half = head_dim // 2
        sin = emb.sin()
        self.register_buffer("cos", emb.cos(), persistent=False)
        # rotate_half(x) * sin == roll(x, half) * sin with its first half negated: one op fewer.
        self.register_buffer("signed_sin", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each token's position, [T, D] float32."""
        return self.cos[positions], self.signed_sin[positions]

    @staticmethod
    def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, heads, D] rotated in float32 and cast back."""
        cos, signed_sin = cos_sin[0].unsqueeze(1), cos_sin[1].unsqueeze(1)
        xf = x.float()
        return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * signed_sin).to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One query token per sequence. q [B, H, D]; k, v [KVH, B, L, D]; bias [B, L] float32 (0 for real
    context, -inf past it). Returns [B, H, D].

    Two batched matmuls with the query heads grouped under their KV head. CPU SDPA's flash kernel
    spends milliseconds per call on this shape (one query row, a mask); this is ~20x faster.
    """
    B, H, D = q.shape
    kvh = k.shape[0]
    qg = q.view(B, kvh, H // kvh, D).transpose(0, 1)  # [KVH, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float()  # [KVH, B, G, L]
    scores = torch.add(bias.view(1, B, 1, -1), scores, alpha=D**-0.5)  # scale and mask in one op
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [KVH, B, G, D]
    return out.transpose(0, 1).reshape(B, H, D)


class Attention(DirectModule):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1):
        super().__init__()
        self.num_heads = cfg.num_heads // tp_size
        self.num_kv_heads = cfg.num_kv_heads // tp_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        # q, k and v fused into one matmul; the loader concatenates the checkpoint's three weights.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs (row-parallel o_proj)
        self.native = False  # RoPE, cache writes and decode attention by native kernels (native.py)

    def forward(self, x, cos_sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """cos_sin: RotaryEmbedding.lookup of the tokens' positions."""
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        k_cache, v_cache = kv_cache  # [KVH, S, D]
        if self.native:
            q, k = native.rope_and_cache(qkv, *cos_sin, meta.slot_mapping, k_cache, v_cache, H)
        else:
            qk = RotaryEmbedding.rotate(qkv[:, : self.q_size + self.kv_size].view(T, H + KVH, D), cos_sin)
            q, k = qk[:, :H], qk[:, H:]
            k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            v_cache.index_copy_(1, meta.slot_mapping, self._values(qkv).transpose(0, 1))

        if meta.decode is not None and not meta.prefills:  # decode only: its tokens are the decode rows, in order
            return self._project(self._decode(q, k_cache, v_cache, meta.decode).view(T, self.q_size))
        v = self._values(qkv)
        out = torch.empty_like(q)  # [T, H, D]
        if meta.decode is not None:
            d = meta.decode
            out.index_copy_(0, d.token_index, self._decode(q.index_select(0, d.token_index), k_cache, v_cache, d))
        for span in meta.prefills:
            if self.native and span.block_table is not None:
                # Every prompt token is a row of the paged kernel, as a decode row is: a token's
                # attention is the same numbers whether it came in a whole prompt, a chunk after
                # cached blocks, or a decode step, so greedy answers do not depend on the cache.
                out[span.start : span.end] = self._decode(q[span.start : span.end], k_cache, v_cache, span.paged)
                continue
            qp = q[span.start : span.end].transpose(0, 1)  # [H, L, D]
            if not span.context_start:
                kp = k[span.start : span.end].transpose(0, 1)  # [KVH, L, D]
                vp = v[span.start : span.end].transpose(0, 1)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:
                kp = k_cache[:, span.kv_slots]  # [KVH, C, D]
                vp = v_cache[:, span.kv_slots]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, enable_gqa=True)
            out[span.start : span.end] = op.transpose(0, 1)
        return self._project(out.view(T, self.q_size))

    def _values(self, qkv: torch.Tensor) -> torch.Tensor:
        """The value heads of the fused projection, [T, KVH, D] (a view)."""
        return qkv[:, self.q_size + self.kv_size :].view(qkv.shape[0], self.num_kv_heads, self.head_dim)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeBatch) -> torch.Tensor:
        """Attention of each decode row's query [B, H, D] over its sequence's cached context."""
        if self.native:
            return native.paged_decode_attention(q, k_cache, v_cache, d.block_tables, d.context_lens, d.block_size,
                                                 self.head_dim**-0.5)
        # Stock torch: copy each sequence's blocks out into a padded [KVH, B, L, D], then matmuls.
        B, KVH, D = q.shape[0], self.num_kv_heads, self.head_dim
        flat_blocks = d.block_tables.view(-1)
        kd = k_cache.view(KVH, -1, d.block_size, D).index_select(1, flat_blocks).view(KVH, B, -1, D)
        vd = v_cache.view(KVH, -1, d.block_size, D).index_select(1, flat_blocks).view(KVH, B, -1, D)
        return decode_attention(q, kd, vd, d.bias)

    def _project(self, attn: torch.Tensor) -> torch.Tensor:
        out = self.o_proj(attn)
        return out if self.reduce is None else self.reduce(out)


class MLP(DirectModule):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size // tp_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=False)
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs (row-parallel down_proj)
        self.native = False  # SiLU(gate) * up by a native kernel (native.py)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.native:
            hidden = native.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            hidden = F.silu(gate) * up
        out = self.down_proj(hidden)
        return out if self.reduce is None else self.reduce(out)


class DecoderLayer(DirectModule):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp_size)

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        """x: the previous layer's output; residual: the stream it adds to (None at a stage's first
        layer, whose x is the stream). Returns this layer's output and the stream, still unadded."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos_sin, kv_cache, meta), residual)
        return self.mlp(h), residual


class LlamaForServing(nn.Module):
    """The whole model, or one worker's partition of it (see Partition): a pipeline stage holds its
    layers, the first the embedding, the last the final norm and LM head."""

    def __init__(self, cfg: LlamaConfig, partition: Partition = Partition()):
        super().__init__()
        self.cfg = cfg
        self.partition = partition
        first, last = partition.is_first_stage(), partition.is_last_stage(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        # A tied LM head reads the embedding table, so the last stage keeps it too.
        needs_embedding = first or (last and cfg.tie_word_embeddings)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if needs_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, partition.tp_size) for _ in partition.layer_ids(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = None if cfg.tie_word_embeddings or not last else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # The LM head as a module of its own, quantized (quant.py) or on the dense kernel (dense.py).
        self.lm_head_kernel: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

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
        x = self.embed_tokens(input_ids) if hidden is None else hidden
        cos_sin = self.rope.lookup(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta)
        return x if residual is None else x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows that sample); returns float32 logits [N, vocab]."""
        hidden, _ = self.norm(hidden)
        if self.lm_head_kernel is not None:
            return self.lm_head_kernel(hidden).float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a HF Llama state dict (names as in `LlamaForCausalLM`), fusing q/k/v and gate/up,
        and keeping only this partition's layers and tensor-parallel slices."""
        cfg, part = self.cfg, self.partition
        params = dict(self.named_parameters())
        r, tp, d = part.tp_rank, part.tp_size, cfg.head_dim
        hq, hk, inter = cfg.num_heads // tp * d, cfg.num_kv_heads // tp * d, cfg.intermediate_size // tp

        def put(name: str, value: torch.Tensor) -> None:
            param = params.pop(name)
            if param.shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
            param.copy_(value)

        def rows(t: torch.Tensor, size: int) -> torch.Tensor:  # column-parallel: this rank's outputs
            return t[r * size : (r + 1) * size]

        def cols(t: torch.Tensor, size: int) -> torch.Tensor:  # row-parallel: this rank's inputs
            return t[:, r * size : (r + 1) * size]

        if self.embed_tokens is not None:
            put("embed_tokens.weight", tensors["model.embed_tokens.weight"])
        if self.norm is not None:
            put("norm.weight", tensors["model.norm.weight"])
        if self.lm_head is not None:
            put("lm_head.weight", tensors["lm_head.weight"])
        for j, i in enumerate(part.layer_ids(cfg)):
            src, dst = f"model.layers.{i}.", f"layers.{j}."
            attn = src + "self_attn."
            put(dst + "self_attn.qkv_proj.weight", torch.cat([
                rows(tensors[attn + "q_proj.weight"], hq), rows(tensors[attn + "k_proj.weight"], hk),
                rows(tensors[attn + "v_proj.weight"], hk)]))
            put(dst + "self_attn.o_proj.weight", cols(tensors[attn + "o_proj.weight"], hq))
            mlp = src + "mlp."
            put(dst + "mlp.gate_up_proj.weight",
                torch.cat([rows(tensors[mlp + "gate_proj.weight"], inter), rows(tensors[mlp + "up_proj.weight"], inter)]))
            put(dst + "mlp.down_proj.weight", cols(tensors[mlp + "down_proj.weight"], inter))
            put(dst + "input_layernorm.weight", tensors[src + "input_layernorm.weight"])
            put(dst + "post_attention_layernorm.weight", tensors[src + "post_attention_layernorm.weight"])
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
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
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
