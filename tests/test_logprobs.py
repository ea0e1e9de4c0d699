"""Log-probabilities the engine reports (top_logprobs, prompt logprobs) against a re-scoring of the
same tokens with the serving model, however the prompt was computed."""

from __future__ import annotations

import pytest

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model.evaluate import prompt_logits
from services.model_shard.model.llama import load_model

PROMPT = [5, 17, 99, 3, 42, 8, 8, 1, 200, 31, 250, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _engine(model, **config) -> LLMEngine:
    return LLMEngine(model, EngineConfig(**{"block_size": 4, "kv_cache_bytes": 1 << 20, **config}))


def _run(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    seq = engine.add_request("r", prompt, params)
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == "r"]
    return seq, outs


def _top(row, k: int) -> tuple[list[int], list[float]]:
    values, ids = row.topk(k)
    return ids.tolist(), values.tolist()


def _assert_top_equal(reported, expected) -> None:
    assert reported[0] == expected[0]
    assert reported[1] == pytest.approx(expected[1], abs=1e-4)


@pytest.mark.parametrize("config", [{}, {"max_batched_tokens": 5}], ids=["whole", "chunked"])
def test_top_and_prompt_logprobs_equal_a_rescoring(model, config):
    engine = _engine(model, **config)
    _run(engine, PROMPT, SamplingParams(max_tokens=2))  # the prompt's blocks are cached now
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=11, logprobs=True, top_logprobs=5,
                            prompt_logprobs=True)
    seq, outs = _run(engine, PROMPT, params)
    tokens = seq.output_token_ids
    scored = prompt_logits(model, PROMPT + tokens).log_softmax(-1)
    # Prompt: one entry per token after the first, all on the first output, none after.
    assert outs[0].prompt_logprobs == pytest.approx(
        [scored[p, PROMPT[p + 1]].item() for p in range(len(PROMPT) - 1)], abs=1e-4)
    for p, top in enumerate(outs[0].prompt_top_logprobs):
        _assert_top_equal(top, _top(scored[p], 5))
    assert len(outs[0].prompt_top_logprobs) == len(PROMPT) - 1
    assert all(o.prompt_logprobs is None for o in outs[1:])
    # Completion: the sampled token's and the 5 most likely at each position.
    reported = [t for o in outs for t in o.new_top_logprobs]
    assert len(reported) == len(tokens)
    for i, top in enumerate(reported):
        _assert_top_equal(top, _top(scored[len(PROMPT) - 1 + i], 5))
    # The prompt was recomputed, not taken from the prefix cache: its log-probabilities need it.
    assert seq.num_cached_tokens == 0


def test_logprobs_cost_nothing_when_off(model):
    _, outs = _run(_engine(model), PROMPT, SamplingParams(max_tokens=3))
    assert all(o.new_logprobs is None and o.new_top_logprobs is None and o.prompt_logprobs is None for o in outs)


def test_prompt_logprobs_survive_preemption(model):
    """A sequence preempted and recomputed reports each prompt position once."""
    engine = _engine(model, max_batched_tokens=4)
    params = SamplingParams(max_tokens=3, prompt_logprobs=True)
    seq = engine.add_request("r", PROMPT, params)
    engine.step()
    engine.step()
    engine.scheduler._preempt(engine.scheduler.running.pop())  # as KV pressure would
    outs = []
    while engine.has_work:
        outs += engine.step()
    scored = prompt_logits(model, PROMPT + seq.output_token_ids).log_softmax(-1)
    assert seq.num_preemptions == 1
    assert outs[0].prompt_logprobs == pytest.approx([scored[p, PROMPT[p + 1]].item() for p in range(len(PROMPT) - 1)],
                                                    abs=1e-4)


def _openai_reference(logits, prompt: list[int], output: list[int], presence: float, frequency: float,
                      bias: dict[int, float]) -> list[float]:
    """OpenAI's definitions, one logit at a time: minus presence once per generated token that
    occurred, minus frequency per occurrence, plus the bias."""
    values = logits.tolist()
    for token in set(output):
        values[token] -= presence + frequency * output.count(token)
    for token, b in bias.items():
        values[token] += b
    return values


def test_penalties_and_bias_on_the_model_equal_the_openai_definitions(model):
    """The processed top_logprobs show the logits the sampler drew from: compared with the model's
    re-scored logits adjusted by the plain definitions, at every step of a real answer."""
    import torch

    bias = {7: 3.5, 42: -2.0, 250: 1.25}
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=4, presence_penalty=0.7, frequency_penalty=0.4,
                            logit_bias=tuple(sorted(bias.items())), logprobs=True, top_logprobs=20)
    seq, outs = _run(_engine(model), PROMPT, params)
    tokens = seq.output_token_ids
    scored = prompt_logits(model, PROMPT + tokens)
    reported = [t for o in outs for t in o.new_top_logprobs]
    for i, (ids, values) in enumerate(reported):
        adjusted = torch.tensor(_openai_reference(scored[len(PROMPT) - 1 + i], PROMPT, tokens[:i], 0.7, 0.4, bias))
        expected = adjusted.log_softmax(-1)
        assert ids == expected.topk(20).indices.tolist()
        assert values == pytest.approx(expected[ids].tolist(), abs=1e-5)
