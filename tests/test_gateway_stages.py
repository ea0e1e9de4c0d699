"""Stages of the gateway's request path, in-process, without a network: admission (rate limit,
priority, the tenant's line), a choice's text (the real vocabulary, stop strings, tool calls, finish
reasons) and a request's usage over its choices."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.admission import Admission
from services.gateway.answer_text import AnswerText
from services.gateway.auth import ApiKeys
from services.gateway.choices import UsageTally
from services.gateway.detokenize import LocalDetokenizeSession, _Vocabulary
from services.gateway.errors import RpcError
from services.gateway.rate_limit import TenantRateLimiter
from services.gateway.tenants import TenantPolicy
from services.tokenizer.text import TextTokenizer

from .conftest import REAL_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(REAL_MODEL_DIR)


def run_text(tokenizer, text: str, stop: list[str], step: int, tools=None, shard_reason: str = "stop"):
    """Feed text's tokens `step` at a time, the last message with the shard's finish reason."""
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    stage = AnswerText(LocalDetokenizeSession(_Vocabulary(tokenizer.tokenizer_json)), stop, tools)

    async def go():
        pieces = []
        for i in range(0, len(ids), step):
            last = i + step >= len(ids)
            pieces.append(await stage.feed(ids[i:i + step], shard_reason if last else ""))
            if pieces[-1].finish_reason:
                break
        return pieces

    return asyncio.run(go())


@pytest.mark.parametrize("step", [1, 2, 5])
def test_text_stage_joins_to_the_decode_and_stops_at_a_stop_string(tokenizer, step):
    text = "Le café coûte 3€. 東京は晴れ 🌤️ today. END and more after it."
    pieces = run_text(tokenizer, text, [], step)
    assert "".join(p.text for p in pieces) == text and "\ufffd" not in "".join(p.text for p in pieces)
    assert [p.finish_reason for p in pieces][-1] == "stop" and not any(p.finish_reason for p in pieces[:-1])
    stopped = run_text(tokenizer, text, ["END"], step, shard_reason="length")
    assert "".join(p.text for p in stopped) == "Le café coûte 3€. 東京は晴れ 🌤️ today. "
    assert stopped[-1].finish_reason == "stop"  # the stop string's, not the shard's "length"


def test_text_stage_takes_tool_calls_out(tokenizer):
    text = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    pieces = run_text(tokenizer, text, [], 3, tools=frozenset({"get_weather"}))
    calls = [c for p in pieces for c in p.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert "".join(p.text for p in pieces) == "Checking."
    assert pieces[-1].finish_reason == "tool_calls"


def test_usage_goes_on_the_requests_last_message_only():
    tally = UsageTally(n=2, prompt_tokens=10)
    messages = [gateway_pb2.GenerateStreamResponse(index=0, token_ids=[1]),
                gateway_pb2.GenerateStreamResponse(index=1, token_ids=[2, 3]),
                gateway_pb2.GenerateStreamResponse(index=0, token_ids=[4], finish_reason="length"),
                gateway_pb2.GenerateStreamResponse(index=1, token_ids=[5], finish_reason="stop")]
    messages[0].usage.cached = 8  # each choice's first message: what its shard had cached
    messages[1].usage.cached = 4
    out = [tally.add(m) for m in messages]
    assert [m.HasField("usage") for m in out] == [False, False, False, True]
    usage = out[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached) == (10, 5, 4)
    assert tally.answer.finished == 2 and tally.answer.choices[1].token_ids == [2, 3, 5]


def test_a_resumed_call_continues_from_what_was_delivered():
    from llmmesh.v1 import common_pb2, shard_pb2
    from services.gateway.choice_stream import resume_request

    first = shard_pb2.ShardGenerateRequest(
        request_id="call-1", prompt_token_ids=[1, 2, 3], tenant="t", retain_blocks=True,
        sampling=common_pb2.SamplingParams(max_tokens=10, min_tokens=4, seed=7, prompt_logprobs=True))
    resumed = resume_request(first, [9, 8, 7])
    assert list(resumed.prompt_token_ids) == [1, 2, 3, 9, 8, 7] and resumed.resume_draws == 3
    assert (resumed.sampling.max_tokens, resumed.sampling.min_tokens) == (7, 1)
    assert not resumed.sampling.prompt_logprobs and resumed.sampling.seed == 7
    assert (resumed.request_id, resumed.tenant, resumed.retain_blocks) == ("call-1", "t", True)
    assert list(first.prompt_token_ids) == [1, 2, 3]  # the first call's request is left as it was


# --- admission ---

def _admission(rps: float = 0, tpm: float = 0, **policy) -> Admission:
    return Admission(ApiKeys({}, {"acme": TenantPolicy(**policy)}), TenantRateLimiter(rps, tpm))


def _request(priority: int | None = None) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(prompt="hi")
    if priority is not None:
        request.priority = priority
    return request


def test_admission_resolves_priority_within_the_tenants_ceiling():
    async def go():
        admission = _admission(priority=1, weight=2.0)
        request = _request()
        async with admission.admit(request, "acme", 30) as admitted:
            assert (admitted.priority, admitted.weight, request.priority) == (1, 2.0, 1)  # the tenant's own class
        async with admission.admit(_request(2), "acme", 30) as admitted:
            assert admitted.priority == 2  # a lower class may be asked for
        with pytest.raises(RpcError) as err:
            async with admission.admit(_request(0), "acme", 30):
                pass
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "interactive" in str(err.value)

    asyncio.run(go())


def test_admission_refuses_past_the_rate_limit_with_a_retry_after():
    async def go():
        admission = _admission(rps=1)
        async with admission.admit(_request(), "acme", 30):
            pass
        with pytest.raises(RpcError) as err:
            async with admission.admit(_request(), "acme", 30):
                pass
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after_s > 0
        async with admission.admit(_request(), "other", 30):  # another tenant's allowance is its own
            pass

    asyncio.run(go())


def test_admission_lines_a_tenant_up_at_max_concurrent_within_the_deadline():
    async def go():
        admission = _admission(max_concurrent=1, max_queued=1)
        async with admission.admit(_request(), "acme", 30):
            with pytest.raises(RpcError) as late:  # waits in line; the deadline passes there
                async with admission.admit(_request(), "acme", 0.05):
                    pass
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "max_concurrent" in str(late.value)
            queued = admission.admit(_request(), "acme", 30)
            waiting = asyncio.ensure_future(queued.__aenter__())
            await asyncio.sleep(0)  # one turn of the loop: it runs up to its wait in the line
            assert admission.gate.queued["acme"] == 1
            with pytest.raises(RpcError) as full:
                async with admission.admit(_request(), "acme", 30):
                    pass
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        admitted = await asyncio.wait_for(waiting, 5)  # let in once the first one ended
        assert admitted.timeout_s <= 30 and admission.gate.running["acme"] == 1
        await queued.__aexit__(None, None, None)
        assert admission.gate.running["acme"] == 0

    asyncio.run(go())


def test_a_timeout_inside_an_admitted_request_is_its_own_not_the_lines():
    async def go():
        admission = _admission(max_concurrent=1)
        with pytest.raises(TimeoutError):
            async with admission.admit(_request(), "acme", 30):
                raise TimeoutError("the request's own")

    asyncio.run(go())


def test_admission_charges_tokens_but_not_replayed_answers():
    admission = _admission(tpm=60)  # one token a second, a minute's worth at most
    admission.charge("acme", common_pb2.Usage(prompt_tokens=40, completion_tokens=20, from_response_cache=True))
    admission.rate_limiter.admit("acme")  # nothing was charged
    admission.charge("acme", common_pb2.Usage(prompt_tokens=50, completion_tokens=20))  # 70: over the minute's 60
    with pytest.raises(Exception, match="token"):
        admission.rate_limiter.admit("acme")


# --- a shard stream started ahead of the response-cache lookup ---

def test_a_started_stream_runs_before_it_is_read_and_stops_when_closed():
    from services.gateway.choices import StartedStream

    async def go():
        started, released = asyncio.Event(), asyncio.Event()

        async def shard_call(items, hold=False):
            try:
                started.set()
                for item in items:
                    if hold:
                        await asyncio.Event().wait()  # a first token that never comes
                    yield item
            finally:
                released.set()

        stream = StartedStream(shard_call([1, 2, 3]))
        await asyncio.wait_for(started.wait(), 5)  # the call began while nobody read it
        assert [item async for item in stream] == [1, 2, 3]
        await stream.aclose()

        started.clear(), released.clear()
        stream = StartedStream(shard_call([1], hold=True))
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(stream.aclose(), 5)  # a cache hit: the waiting call is cancelled
        assert released.is_set()

        async def failing():
            raise RuntimeError("the shard said no")
            yield  # unreachable: it makes this an async generator

        with pytest.raises(RuntimeError, match="said no"):
            await anext(StartedStream(failing()))

    asyncio.run(go())


# --- the encode stage, against a real tokenizer service in-process ---

def test_the_encode_stage_gets_the_templates_tokens_and_reports_a_missing_tokenizer(tokenizer):
    import time

    from llmmesh.v1 import common_pb2 as common, tokenizer_pb2_grpc
    from services.gateway.prompt_encoding import Continuation, encode_prompt
    from services.tokenizer.text import Message

    from .conftest import free_ports, with_tokenizer_service

    request = gateway_pb2.GenerateRequest(messages=[common.ChatMessage(role="user", content="Bonjour !")])

    async def encodes(tokenizer, stub):
        ids, version, _ = await encode_prompt(stub, request, time.monotonic() + 10, 5.0)
        assert ids == tokenizer.encode_chat([Message("user", "Bonjour !")]) and version
        turn = Continuation(context_ids=ids)  # a stored turn's next message: its ids come back as they are
        again, _, _ = await encode_prompt(stub, request, time.monotonic() + 10, 5.0, turn)
        assert again[:len(ids)] == ids and turn.prompt_ids == again

    async def no_tokenizer():
        dead, = free_ports(1)  # nothing listens: tried twice, then UNAVAILABLE naming the tokenizer
        async with grpc.aio.insecure_channel(f"127.0.0.1:{dead}") as channel:
            with pytest.raises(RpcError) as err:
                await encode_prompt(tokenizer_pb2_grpc.TokenizerStub(channel), request, time.monotonic() + 10, 2.0)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "tokenizer" in str(err.value)

    asyncio.run(with_tokenizer_service(tokenizer, encodes))
    asyncio.run(no_tokenizer())
