"""Qwen2 and Qwen2.5: Llama with biases on q, k and v (not o). Sliding-window layers only with
use_sliding_window, from layer max_window_layers on (as transformers' Qwen2Config fills layer_types)."""

from services.model_shard.model.families import Family, sliding_layers

SLIDING_FIELDS = frozenset({"sliding_window", "use_sliding_window", "layer_types"})


def sliding(d: dict) -> dict:
    """Qwen's sliding-window fields, shared with Qwen3."""
    if not d.get("use_sliding_window"):
        return dict(sliding_window=None, layer_types=())
    start = d.get("max_window_layers", d["num_hidden_layers"])
    return dict(sliding_window=d.get("sliding_window"), layer_types=sliding_layers(d, lambda i: i >= start))


def fields(d: dict) -> dict:
    return dict(qkv_bias=True, **sliding(d))


FAMILY = Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), fields, SLIDING_FIELDS)
