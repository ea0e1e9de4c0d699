"""A compact Llama for serving: one flat batch of tokens over a paged KV cache.

Every sequence in a step contributes its new tokens to one flat batch `[T]`; attention reads each
sequence's context from the KV cache through slot indices (`AttentionMetadata`), so sequences of any
length share one forward pass with no padding of the projections or the MLP.

The KV cache of a layer is a pair of tensors `[num_kv_heads, num_slots, head_dim]`, a slot being
`block_id * block_size + offset`: tokens are written by slot, and decode reads whole blocks
through each sequence's block table (a block is a contiguous run of slots).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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
    mask: torch.Tensor  # [B, N * block_size] True where the key is real context


@dataclass
class PrefillSpan:
    """A sequence that adds several tokens (a prompt, or a chunk of one)."""

    start: int  # its tokens are flat[start:end]
    end: int
    kv_slots: torch.Tensor | None  # [C] all context slots; None when the span is the whole context
    mask: torch.Tensor | None  # [1, end-start, C] causal mask over the context; None with kv_slots None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: DecodeBatch | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary positions, non-interleaved halves (HF layout)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        qf, kf = q.float(), k.float()
        q = (qf * cos + self._rotate_half(qf) * sin).to(q.dtype)
        k = (kf * cos + self._rotate_half(kf) * sin).to(k.dtype)
        return q, k


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query token per sequence. q [B, H, D]; k, v [KVH, B, L, D]; mask [B, L] (True = real
    context). Returns [B, H, D].

    Two batched matmuls with the query heads grouped under their KV head. CPU SDPA's flash kernel
    spends milliseconds per call on this shape (one query row, a mask); this is ~20x faster.
    """
    B, H, D = q.shape
    kvh = k.shape[0]
    qg = q.view(B, kvh, H // kvh, D).transpose(0, 1)  # [KVH, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (D**-0.5)  # [KVH, B, G, L]
    scores = scores.masked_fill(~mask.view(1, B, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [KVH, B, G, D]
    return out.transpose(0, 1).reshape(B, H, D)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, rope: RotaryEmbedding, tp_size: int = 1):
        super().__init__()
        self.num_heads = cfg.num_heads // tp_size
        self.num_kv_heads = cfg.num_kv_heads // tp_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        # q, k and v fused into one matmul; the loader concatenates the checkpoint's three weights.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rope = rope
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs (row-parallel o_proj)

    def forward(self, x, positions, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        q, k = self.rope(positions, q, k)

        k_cache, v_cache = kv_cache  # [KVH, S, D]
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))

        out = torch.empty_like(q)  # [T, H, D]
        if meta.decode is not None:
            d = meta.decode
            B, N = d.block_tables.shape
            blocks = (self.num_kv_heads, -1, d.mask.shape[1] // N, self.head_dim)  # [KVH, blocks, bs, D]
            kd = k_cache.view(blocks)[:, d.block_tables].view(self.num_kv_heads, B, -1, self.head_dim)
            vd = v_cache.view(blocks)[:, d.block_tables].view(self.num_kv_heads, B, -1, self.head_dim)
            out.index_copy_(0, d.token_index, decode_attention(q.index_select(0, d.token_index), kd, vd, d.mask))
        for span in meta.prefills:
            qp = q[span.start : span.end].transpose(0, 1)  # [H, L, D]
            if span.kv_slots is None:
                kp = k[span.start : span.end].transpose(0, 1)  # [KVH, L, D]
                vp = v[span.start : span.end].transpose(0, 1)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:
                kp = k_cache[:, span.kv_slots]  # [KVH, C, D]
                vp = v_cache[:, span.kv_slots]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, enable_gqa=True)
            out[span.start : span.end] = op.transpose(0, 1)
        out = self.o_proj(out.view(T, self.q_size))
        return out if self.reduce is None else self.reduce(out)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp_size: int = 1):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size // tp_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=False)
        self.reduce = None  # tensor parallel: sums the ranks' partial outputs (row-parallel down_proj)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.reduce is None else self.reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, rope: RotaryEmbedding, tp_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp_size)

    def forward(self, x, positions, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForServing(nn.Module):
    """The whole model, or one worker's partition of it (see Partition): a pipeline stage holds its
    layers, the first the embedding, the last the final norm and LM head."""

    def __init__(self, cfg: LlamaConfig, partition: Partition = Partition()):
        super().__init__()
        self.cfg = cfg
        self.partition = partition
        first, last = partition.is_first_stage(), partition.is_last_stage(cfg)
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        # A tied LM head reads the embedding table, so the last stage keeps it too.
        needs_embedding = first or (last and cfg.tie_word_embeddings)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if needs_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, partition.tp_size) for _ in partition.layer_ids(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = None if cfg.tie_word_embeddings or not last else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head_int8: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def num_kv_heads(self) -> int:
        """KV heads this partition holds per layer."""
        return self.cfg.num_kv_heads // self.partition.tp_size

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
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows that sample); returns float32 logits [N, vocab]."""
        hidden = self.norm(hidden)
        if self.lm_head_int8 is not None:  # set by quant.quantize_int8
            return self.lm_head_int8(hidden).float()
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
               partition: Partition = Partition()) -> LlamaForServing:
    """Build the serving model (or one worker's partition of it) from a folder with config.json and
    *.safetensors. quantization: None, "int8" or "int4" (weight-only, see quant.py)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg = LlamaConfig.from_dir(model_dir)
    if partition.tp_size > 1:
        check_parallel(cfg, partition.tp_size, 1)
    with torch.device("meta"):
        model = LlamaForServing(cfg, partition)
    model = model.to_empty(device="cpu")
    # Buffers built on meta are empty: rebuild the RoPE tables for real.
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    for layer in model.layers:
        layer.self_attn.rope = rope
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    model.load_weights(tensors)
    model = model.to(dtype).eval()
    rope.cos, rope.sin = rope.cos.float(), rope.sin.float()  # positions stay exact in any dtype
    if quantization in ("int8", "int4"):
        from services.model_shard.model.quant import quantize

        quantize(model, quantization)
    elif quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r}; expected int8 or int4")
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
