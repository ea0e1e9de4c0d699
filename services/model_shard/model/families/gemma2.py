"""Gemma 2: norms before and after attention and the MLP ("sandwich"), each scaling by 1 + weight;
embeddings times sqrt(hidden_size); GELU (tanh) gating; attention scaled by query_pre_attn_scalar and
soft-capped, as are the final logits; sliding-window layers alternating with full ones."""

from services.model_shard.model.families import Family, UnsupportedModel, sliding_layers

GEMMA_FIELDS = frozenset({"hidden_act", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                          "final_logit_softcapping", "sliding_window", "layer_types", "attention_bias"})


def gemma_fields(d: dict, default_sliding) -> dict:
    """What Gemma 2 and 3 share."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModel(f"{(d.get('architectures') or ['Gemma'])[0]}: hidden_activation={act!r} is not implemented "
                               "(only gelu_pytorch_tanh)")
    attention_bias = bool(d.get("attention_bias"))
    return dict(norm_form="sandwich", norm_offset=1.0, hidden_act="gelu_tanh", embed_scale=d["hidden_size"] ** 0.5,
                attn_scale=d.get("query_pre_attn_scalar", 256) ** -0.5, qkv_bias=attention_bias,
                o_bias=attention_bias, attn_softcap=d.get("attn_logit_softcapping"),
                final_softcap=d.get("final_logit_softcapping"), sliding_window=d.get("sliding_window"),
                layer_types=sliding_layers(d, default_sliding),
                tie_word_embeddings=d.get("tie_word_embeddings", True))


def fields(d: dict) -> dict:
    return gemma_fields(d, lambda i: (i + 1) % 2 != 0)


FAMILY = Family("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), fields, GEMMA_FIELDS)
