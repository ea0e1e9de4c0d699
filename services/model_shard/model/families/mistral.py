"""Mistral: Llama with every layer attending to a sliding window of `sliding_window` keys (null: full
attention)."""

from services.model_shard.model.families import Family


def fields(d: dict) -> dict:
    return dict(sliding_window=d.get("sliding_window") or None)


FAMILY = Family("mistral", ("MistralForCausalLM",), ("mistral",), fields, frozenset({"sliding_window"}))
