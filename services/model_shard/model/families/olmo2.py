"""OLMo 2: norms after attention and after the MLP, none before ("post"), and q/k RMSNorms over all
heads at once (so one norm spans every tensor-parallel rank's heads: tensor parallel is refused)."""

from services.model_shard.model.families import Family


def fields(d: dict) -> dict:
    attention_bias = bool(d.get("attention_bias"))
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm="full", norm_form="post")


FAMILY = Family("olmo2", ("Olmo2ForCausalLM",), ("olmo2",), fields, frozenset({"attention_bias"}))
