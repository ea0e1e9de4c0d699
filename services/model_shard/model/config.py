"""The decoder's configuration, read from a checkpoint's config.json through its family (families/).

The fields past `eos_token_ids` say how a family departs from Llama 2; their defaults are Llama 2.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from services.model_shard.model.rope import check_rope, context_cap

log = logging.getLogger(__name__)
FULL, SLIDING = "full_attention", "sliding_attention"


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
    architecture: str = "LlamaForCausalLM"
    family: str = "llama"  # the families/ module that reads this checkpoint's weights
    # RoPE parameters (rope_type, rope_theta, the type's fields) of full-attention layers, and of
    # sliding-window layers where they differ (Gemma 3's local base frequency); compare=False: dicts.
    rope: dict = field(default_factory=dict, compare=False)
    local_rope: dict | None = field(default=None, compare=False)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = ""  # "head": RMSNorm over each head (Qwen3, Gemma 3); "full": over all heads (OLMo 2)
    norm_form: str = "pre"  # "pre" (Llama), "sandwich" (Gemma 2/3: norms before and after), "post" (OLMo 2)
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + weight); folded into the weight at load
    hidden_act: str = "silu"  # or "gelu_tanh" (Gemma)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None
    sliding_window: int | None = None  # keys a token sees in a sliding layer, itself included
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; empty: all FULL
    num_experts: int = 0  # > 0: a sparse mixture-of-experts MLP (moe.py)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # each expert's
    norm_topk_prob: bool = True  # renormalise the chosen experts' router probabilities to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP in a MoE model

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def window_of(self, layer: int) -> int | None:
        """The sliding window of a layer, or None for full attention."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != SLIDING):
            return None
        return self.sliding_window

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        """Read a config.json; an architecture or a field the decoder does not implement is refused
        with UnsupportedModel (families/)."""
        from services.model_shard.model.families import family_of

        family = family_of(d)
        fields = base_fields(d)
        fields.update(family.fields(d))
        return cls(architecture=(d.get("architectures") or [family.architectures[0]])[0], family=family.name, **fields)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "LlamaConfig":
        return cls.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))


def base_fields(d: dict) -> dict:
    """What every family reads the same way."""
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    num_heads = d["num_attention_heads"]
    rope = rope_parameters(d)
    max_positions = d.get("max_position_embeddings", 2048)
    if context_cap(rope, max_positions) < max_positions:
        log.warning("context capped at %d positions of the config's %d: longer contexts would need longrope's "
                    "long factors, which re-rotate cached keys (model/rope.py)", context_cap(rope, max_positions),
                    max_positions)
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=d.get("num_key_value_heads") or num_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope["rope_theta"]),
        rope=rope,
        max_position_embeddings=context_cap(rope, max_positions),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def rope_parameters(d: dict, layer_type: str | None = None) -> dict:
    """One RoPE parameter dict, completed as transformers' standardize_rope_params does: config.json
    has `rope_parameters` (transformers 5) or `rope_scaling` beside `rope_theta` (4.x); Gemma 3's
    is nested by layer type."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    elif FULL in params:
        params = params[FULL] or {}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in d:  # Phi-3 keeps it outside; it takes priority there
            params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    if params["rope_type"] in ("yarn", "longrope") and not params.get("factor"):
        # Their default factor is the config's context over the original one; fixed here, before
        # longrope's context cap (rope.context_cap) shortens max_position_embeddings.
        params["factor"] = d.get("max_position_embeddings", 2048) / params["original_max_position_embeddings"]
    check_rope(params, "rope_parameters" + (f"[{layer_type!r}]" if layer_type else ""))
    return params


def layer_types_of(d: dict) -> tuple[str, ...]:
    """Each layer's attention kind from config.json's layer_types (transformers 5 writes it); a
    kind other than full or sliding attention is refused."""
    from services.model_shard.model.families import UnsupportedModel

    kinds = tuple(d.get("layer_types") or ())
    if kinds and len(kinds) != d["num_hidden_layers"]:
        raise UnsupportedModel(f"layer_types names {len(kinds)} layers, the model has {d['num_hidden_layers']}")
    for kind in set(kinds) - {FULL, SLIDING}:
        raise UnsupportedModel(f"layer_types: attention kind {kind!r} is not supported (only {FULL!r}, {SLIDING!r})")
    return kinds
