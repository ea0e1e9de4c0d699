"""n choices, top logprobs and prompt logprobs through the mesh (gRPC, real model, real processes)."""

from __future__ import annotations

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2

from .conftest import metric

pytestmark = pytest.mark.e2e

STORY = [common_pb2.ChatMessage(role="user", content="Tell me a short story about a lighthouse keeper and a storm.")]


def _stream(gateway, **request) -> list[gateway_pb2.GenerateStreamResponse]:
    return list(gateway.GenerateStream(gateway_pb2.GenerateRequest(**request), timeout=180))


def _by_choice(chunks) -> dict[int, tuple[list[int], str, str]]:
    out: dict[int, tuple[list[int], str, str]] = {}
    for c in chunks:
        tokens, text, reason = out.get(c.index, ([], "", ""))
        out[c.index] = (tokens + list(c.token_ids), text + c.text, c.finish_reason or reason)
    return out


def _allocated(mesh) -> float:
    return sum(metric(spec.metrics_port, "llmmesh_kv_blocks_allocated_total") for spec in mesh.plan.shards)


def test_seeded_choices_are_the_requests_with_the_matching_seeds(mesh, gateway):
    sampling = dict(max_tokens=40, temperature=0.9, top_p=0.95, ignore_eos=True)
    before = _allocated(mesh)
    chunks = _stream(gateway, messages=STORY, sampling=common_pb2.SamplingParams(**sampling, seed=7, n=3))
    blocks = _allocated(mesh) - before
    choices = _by_choice(chunks)
    assert sorted(choices) == [0, 1, 2]
    for i in range(3):  # the seed rule: choice i samples with seed + i
        alone = _by_choice(_stream(gateway, messages=STORY, sampling=common_pb2.SamplingParams(**sampling, seed=7 + i)))
        assert choices[i] == alone[0]
    assert len({tuple(tokens) for tokens, _, _ in choices.values()}) == 3  # three different stories
    # One finish per choice; usage once, on the very last message: the prompt counted once.
    assert sum(bool(c.finish_reason) for c in chunks) == 3
    assert [c.HasField("usage") for c in chunks].count(True) == 1 and chunks[-1].HasField("usage")
    usage = chunks[-1].usage
    assert usage.completion_tokens == 3 * 40
    # The prompt's full blocks were computed and allocated once, for all three choices (less those an
    # earlier request left in the prefix cache: the chat template's system prompt).
    shared = (usage.prompt_tokens - 1) // 16
    own = -(-(usage.prompt_tokens + 40) // 16) - shared
    assert blocks == shared - usage.cached // 16 + 3 * own


def test_greedy_choices_are_equal_and_unary_lists_them(gateway):
    request = gateway_pb2.GenerateRequest(messages=STORY, sampling=common_pb2.SamplingParams(max_tokens=12, n=2))
    reply = gateway.Generate(request, timeout=120)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text == reply.text
    assert list(reply.choices[1].token_ids) == list(reply.token_ids)
    assert reply.usage.completion_tokens == 2 * len(reply.token_ids)
    again = gateway.Generate(request, timeout=120)  # greedy: a response-cache hit, every choice in it
    assert again.usage.from_response_cache and list(again.choices) == list(reply.choices)


def test_choices_with_a_stop_string_stop_each_on_its_own(gateway):
    sampling = common_pb2.SamplingParams(max_tokens=60, temperature=1.0, seed=3, n=4, stop=["."])
    choices = _by_choice(_stream(gateway, messages=STORY, sampling=sampling))
    assert len(choices) == 4
    for tokens, text, reason in choices.values():
        assert "." not in text and (reason == "stop" or len(tokens) == 60)


def test_top_logprobs_rank_the_alternatives_and_include_the_greedy_pick(gateway):
    sampling = common_pb2.SamplingParams(max_tokens=10, logprobs=True, top_logprobs=5)
    chunks = _stream(gateway, messages=STORY, sampling=sampling)
    for c in chunks:
        assert len(c.top_logprobs) == len(c.token_ids) == len(c.logprobs)
        for token, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
            assert len(top.token_ids) == 5 and list(top.logprobs) == sorted(top.logprobs, reverse=True)
            assert top.token_ids[0] == token and top.logprobs[0] == pytest.approx(lp)


def test_prompt_logprobs_come_first_with_the_prompts_tokens(gateway):
    sampling = common_pb2.SamplingParams(max_tokens=3, prompt_logprobs=True, top_logprobs=2)
    chunks = _stream(gateway, prompt="The capital of France is Paris. The capital of Italy is", sampling=sampling)
    first = chunks[0]
    n = chunks[-1].usage.prompt_tokens
    assert len(first.prompt_token_ids) == n and len(first.prompt_logprobs) == n - 1
    assert len(first.prompt_top_logprobs) == n - 1
    assert all(lp <= 0 for lp in first.prompt_logprobs)
    assert all(not c.prompt_logprobs for c in chunks[1:])
    assert not chunks[0].logprobs  # logprobs of the completion were not asked for


@pytest.mark.parametrize("sampling,fragment", [
    (common_pb2.SamplingParams(n=17), "at most 16 choices"),
    (common_pb2.SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20]"),
    (common_pb2.SamplingParams(top_logprobs=3), "needs logprobs"),
])
def test_bad_choices_and_logprobs_are_invalid_argument(gateway, sampling, fragment):
    with pytest.raises(grpc.RpcError) as err:
        gateway.Generate(gateway_pb2.GenerateRequest(prompt="hello", sampling=sampling), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


def test_choices_with_a_grammar_each_follow_it(gateway):
    import re

    pattern = "(red|green|blue)( (red|green|blue)){2}"
    sampling = common_pb2.SamplingParams(max_tokens=24, temperature=1.0, seed=11, n=3,
                                         structured=common_pb2.StructuredOutput(regex=pattern))
    choices = _by_choice(_stream(gateway, messages=STORY, sampling=sampling))
    assert sorted(choices) == [0, 1, 2]
    for _, text, reason in choices.values():
        assert re.fullmatch(pattern, text) and reason == "stop"
