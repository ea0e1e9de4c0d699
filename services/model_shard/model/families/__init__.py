"""The model registry: a checkpoint's `architectures` (or, without it, its `model_type`) picks the
family module that says how the family departs from the shared decoder (model/llama.py).

A family module defines FAMILY: which config fields it reads into LlamaConfig (`fields`), which of
the fields that change the math it implements (`handles`), and how its checkpoint's tensor names
map onto Llama's (`weights`). Anything else is refused at start by name: an architecture not listed
here, or a field in MATH_FIELDS set to a value other than its neutral one that the family does not
implement. Never a KeyError, never a silently wrong answer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe")


class UnsupportedModel(ValueError):
    pass


def _same_weights(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    return tensors


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    fields: Callable[[dict], dict]  # config.json -> the LlamaConfig fields where it is not Llama 2
    handles: frozenset[str] = frozenset()  # MATH_FIELDS it implements
    weights: Callable[[dict, object], dict] = _same_weights  # checkpoint tensors -> Llama's names


def _no(value) -> bool:
    return value is None or value is False or value == 0


# Config fields that change what the model computes, and when a value is neutral (the Llama 2
# math). A family that does not list a field in `handles` is refused when the field is not neutral.
MATH_FIELDS: dict[str, Callable[[object], bool]] = {
    "attention_bias": _no,
    "mlp_bias": _no,
    "qk_layernorm": _no,
    "use_qk_norm": _no,
    "sliding_window": _no,
    "use_sliding_window": _no,
    "layer_types": lambda v: not v or set(v) == {"full_attention"},
    "attn_logit_softcapping": _no,
    "final_logit_softcapping": _no,
    "query_pre_attn_scalar": _no,
    "hidden_act": lambda v: v in (None, "silu"),
    "hidden_activation": lambda v: v in (None, "silu"),
    "partial_rotary_factor": lambda v: v in (None, 1, 1.0),
    "embedding_multiplier": lambda v: v in (None, 1, 1.0),
    "residual_multiplier": lambda v: v in (None, 1, 1.0),
    "logits_scaling": lambda v: v in (None, 1, 1.0),
    "attention_multiplier": _no,
    "use_bidirectional_attention": _no,
    "attention_chunk_size": _no,
    "no_rope_layers": _no,
    "num_local_experts": _no,
    "num_experts": _no,
    "n_routed_experts": _no,
    "quantization_config": _no,
}


def _load() -> dict[str, Family]:
    families = [importlib.import_module(f"{__name__}.{m}").FAMILY for m in MODULES]
    return {f.name: f for f in families}


_FAMILIES: dict[str, Family] | None = None


def families() -> dict[str, Family]:
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = _load()
    return _FAMILIES


def supported_architectures() -> list[str]:
    return sorted(a for f in families().values() for a in f.architectures)


def family_named(name: str) -> Family:
    return families()[name]


def family_of(d: dict) -> Family:
    """The family of a config.json, refusing what the decoder does not implement."""
    archs, model_type = d.get("architectures") or [], d.get("model_type")
    found = [f for f in families().values() if (archs and archs[0] in f.architectures)
             or (not archs and model_type in f.model_types)]
    if not found:
        what = f"architecture {archs[0]!r}" if archs else f"model_type {model_type!r}"
        raise UnsupportedModel(f"unsupported {what}; supported architectures: {', '.join(supported_architectures())}")
    family = found[0]
    for name, neutral in MATH_FIELDS.items():
        if name in d and name not in family.handles and not neutral(d[name]):
            raise UnsupportedModel(f"{family.architectures[0]}: config field {name}={d[name]!r} is not implemented "
                                   f"for this family (it changes the model's output); the {family.name} family "
                                   f"implements: {', '.join(sorted(family.handles)) or 'none of ' + ', '.join(MATH_FIELDS)}")
    return family


def sliding_layers(d: dict, default: Callable[[int], bool]) -> tuple[str, ...]:
    """layer_types from config.json, or per default(layer) -> sliding?, as the family's config class
    fills it in."""
    from services.model_shard.model.config import FULL, SLIDING, layer_types_of

    return layer_types_of(d) or tuple(SLIDING if default(i) else FULL for i in range(d["num_hidden_layers"]))
