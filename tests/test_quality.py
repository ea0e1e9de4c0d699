"""bfloat16, int8 and int4 serving, and whatever precision a shard chooses by default here, stay close to
float32 on the real model: perplexity, and the answers to plain questions."""

from __future__ import annotations

import pytest
import torch

from services.model_shard.engine.engine import DTYPES, EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model.evaluate import perplexity
from services.model_shard.model.llama import load_model
from services.model_shard.model.precision import resolve_dtype, resolve_quantization
from services.tokenizer.text import Message, TextTokenizer

# A fixed English text (public-domain style prose) for perplexity.
TEXT = (
    "The river wound slowly through the valley, past fields of wheat and small stone houses. In the "
    "morning the farmers walked to the market in the town, carrying baskets of bread, cheese and "
    "apples. Children ran along the road and dogs barked at the carts. By noon the square was full "
    "of voices, and the smell of fresh coffee drifted from the cafe near the church. When the sun "
    "began to set, the people went home, and the valley grew quiet again under the first stars."
)
# Questions whose answer the float32 model gives with a clear margin: a 135M model's greedy answer to a
# loosely put question can hang on a near-tie (on "What is the capital of France?" its first token is
# "The" by 0.08 nats over "L'"), and such a tie flips with any change of rounding, better or worse.
QUESTIONS = ["What is the capital of France? Answer in one word.", "What is 2 + 2? Answer with a number.",
             "How many legs does a dog have?", "What color is the sky on a clear day?",
             "Paris is the capital of which country?"]
EXPECTED = ["paris", "4", "four", "blue", "france"]


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return TextTokenizer(real_model_dir)


@pytest.fixture(scope="module")
def fp32_perplexity(real_model_dir, tokenizer):
    return perplexity(load_model(real_model_dir, torch.float32), tokenizer.encode(TEXT))


def _default_precision(model_dir) -> tuple[torch.dtype, str | None]:
    """What a shard serves with no precision flags, on this machine (model/precision.py)."""
    dtype = resolve_dtype("auto").value
    return DTYPES[dtype], resolve_quantization("auto", model_dir, dtype, native_kernels=True).value


@pytest.mark.parametrize("dtype,quantization", [(torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.float32, "int8"),
                                                (torch.bfloat16, "int4"), ("default", None)])
def test_perplexity_moves_less_than_five_percent(real_model_dir, tokenizer, fp32_perplexity, dtype, quantization):
    if dtype == "default":
        dtype, quantization = _default_precision(real_model_dir)
    model = load_model(real_model_dir, dtype, quantization)
    ppl = perplexity(model, tokenizer.encode(TEXT))
    print(f"perplexity float32 {fp32_perplexity:.3f}  {dtype} {quantization or ''}: {ppl:.3f}")
    assert fp32_perplexity < 30  # the text is ordinary English: a sane model finds it likely
    assert abs(ppl - fp32_perplexity) / fp32_perplexity < 0.05

    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=64 << 20))
    prompts = [tokenizer.encode_chat([Message("user", q)]) for q in QUESTIONS]
    for answer, expected in zip(engine.generate(prompts, SamplingParams(max_tokens=24)), EXPECTED):
        text = tokenizer.decode(answer)
        assert expected in text.lower(), text
