"""Requests with one prompt that run at the same time (the choices of an n > 1 request) prefill it once
and share its KV blocks by reference count; each gets exactly the tokens it would get alone."""

from __future__ import annotations

import pytest

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model.llama import load_model

PROMPT = [5, 17, 99, 3, 42, 8, 8, 1, 200, 31, 250, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]  # 22 tokens: 5 full blocks of 4
BLOCK = 4


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _engine(model, **config) -> LLMEngine:
    return LLMEngine(model, EngineConfig(**{"block_size": BLOCK, "kv_cache_bytes": 1 << 20, **config}))


def _choices(n: int, seed: int = 40) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=6, temperature=0.9, seed=seed + i) for i in range(n)]


@pytest.mark.parametrize("max_batched_tokens", [512, 7], ids=["whole", "chunked"])
def test_choices_share_the_prompts_blocks_and_match_separate_requests(model, max_batched_tokens):
    alone = [_engine(model).generate([PROMPT], p)[0] for p in _choices(4)]
    engine = _engine(model, max_batched_tokens=max_batched_tokens)
    together = engine.generate([PROMPT] * 4, _choices(4))
    assert together == alone
    # The 5 full prompt blocks before the last prompt token are computed and allocated once; each
    # choice allocates its own from there (the last prompt tokens and its answer: 28 tokens, 7 blocks).
    shared = (len(PROMPT) - 1) // BLOCK
    own = -(-(len(PROMPT) + 6) // BLOCK) - shared
    assert engine.pool.stats.allocated_blocks == shared + 4 * own
    assert engine.stats.computed_tokens == len(PROMPT) + 3 * (len(PROMPT) - shared * BLOCK) + 4 * 5

    unshared = _engine(model, max_batched_tokens=max_batched_tokens, enable_prefix_caching=False)
    assert unshared.generate([PROMPT] * 4, _choices(4)) == alone
    assert unshared.pool.stats.allocated_blocks == 4 * (shared + own)


def test_a_waiting_choice_goes_on_alone_when_the_one_computing_its_blocks_is_aborted(model):
    engine = _engine(model, max_batched_tokens=8)
    first = engine.add_request("a", PROMPT, _choices(1)[0])
    second = engine.add_request("b", PROMPT, _choices(2)[1])
    engine.step()  # "a" computes its first 8 prompt tokens; "b" waits for the rest of them
    assert engine.scheduler.waiting[0] is second
    engine.abort("a")
    while engine.has_work:
        engine.step()
    assert first.finish_reason.value == "aborted" and len(second.output_token_ids) == 6
    assert second.output_token_ids == _engine(model).generate([PROMPT], _choices(2)[1])[0]
    assert engine.pool.num_used == 0


def test_other_prompts_are_not_held_up_behind_a_waiting_choice(model):
    engine = _engine(model, max_batched_tokens=64)
    engine.add_request("a", PROMPT, _choices(1)[0])
    engine.add_request("b", PROMPT, _choices(1)[0])
    other = engine.add_request("c", [9, 8, 7, 6, 5, 4, 3], _choices(1)[0])
    out = engine.scheduler.schedule()
    assert [item.seq.request_id for item in out.scheduled] == ["a", "c"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["b"] and other in engine.scheduler.running
