"""Speculative decoding by prompt lookup: the same tokens with it on or off, greedy and seeded."""

from __future__ import annotations

import pytest
import torch

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.engine.proposers import NgramIndex
from services.model_shard.engine.speculative import SpeculativeConfig, accepted_prefix
from services.model_shard.model.llama import load_model
from services.tokenizer.text import Message, TextTokenizer

PARAGRAPH = ("The river wound slowly through the valley, past fields of wheat and small stone houses. In the "
             "morning the farmers walked to the market in the town, carrying baskets of bread, cheese and apples.")


def test_ngram_index_proposes_what_followed_the_latest_match():
    index = NgramIndex(2, 3)
    assert index.propose([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]
    assert index.propose([1, 2, 3, 4, 9, 2, 3, 4, 7, 3, 4], 3) == [7, 3, 4]  # the later occurrence wins
    assert NgramIndex(2, 3).propose([5, 6, 7], 4) == []
    assert accepted_prefix([4, 9, 1], [4, 9, 2, 8]) == 2 and accepted_prefix([4], [5, 4]) == 0


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40),
                                    SamplingParams(max_tokens=40, temperature=0.8, seed=7, repetition_penalty=1.1,
                                                   logprobs=True, top_logprobs=2)], ids=["greedy", "seeded"])
def test_tokens_are_the_same_with_speculation_on_or_off(real_model_dir, params):
    tok = TextTokenizer(real_model_dir)
    prompts = [tok.encode_chat([Message("user", f"Repeat this text exactly: {PARAGRAPH}")]),
               tok.encode_chat([Message("user", "Write a haiku about rain.")])]
    model = load_model(real_model_dir, torch.bfloat16, "int4")

    def run(method: str) -> tuple[list, LLMEngine]:
        engine = LLMEngine(model, EngineConfig(dtype="bfloat16", quantization="int4", kv_cache_bytes=64 << 20,
                                               speculative=SpeculativeConfig(method=method)))
        return [engine.generate([p], params)[0] for p in prompts] + [engine.generate(prompts, params)], engine

    plain, _ = run("off")
    drafted, engine = run("ngram")
    assert drafted == plain
    stats = engine.scheduler.speculator.totals()
    assert stats.proposed > 0 and stats.accepted > 0
    assert engine.pool.num_free == engine.pool.num_blocks  # rejected proposals' blocks were given back
    if params.temperature == 0:
        assert engine.stats.steps < sum(len(t) for t in plain[:2]) + len(plain[2][0])  # tokens came several a step
