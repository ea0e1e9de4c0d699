"""The mesh as real processes on loopback with the real model: what a client sees."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2
from llmmesh.v1 import tokenizer_pb2_grpc
from services.common.server import LIVENESS_SERVICE
from services.launcher import ServiceSpec, free_port, wait_healthy
from services.trace_view import load_spans

from .conftest import metric, wait_for

pytestmark = pytest.mark.e2e

FRANCE = [common_pb2.ChatMessage(role="user", content="What is the capital of France?")]
CHINESE = [common_pb2.ChatMessage(role="user", content="请用中文介绍一下北京。")]


def _stream(gateway, timeout=120, **request) -> list[gateway_pb2.GenerateStreamResponse]:
    return list(gateway.GenerateStream(gateway_pb2.GenerateRequest(**request), timeout=timeout))


def test_streamed_greedy_answer_names_paris(gateway):
    chunks = _stream(gateway, messages=FRANCE, sampling=common_pb2.SamplingParams(max_tokens=48))
    text = "".join(c.text for c in chunks)
    assert len(chunks) >= 3
    assert "Paris" in text
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and all(not c.finish_reason for c in chunks[:-1])
    assert last.usage.prompt_tokens > 0
    assert last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)


def test_unary_equals_stream_and_repeat_is_a_cache_hit(gateway):
    sampling = common_pb2.SamplingParams(max_tokens=24)
    prompt = "The three primary colors are"
    streamed = _stream(gateway, prompt=prompt, sampling=sampling)
    assert not streamed[-1].usage.from_response_cache and streamed[-1].usage.cached == 0
    # A finished call has stored its answer: the identical greedy request is a cache hit.
    again = gateway.Generate(gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling), timeout=120)
    assert again.usage.from_response_cache
    assert again.usage.cached == again.usage.prompt_tokens + again.usage.completion_tokens
    assert again.text == "".join(c.text for c in streamed)
    assert list(again.token_ids) == [t for c in streamed for t in c.token_ids]
    assert again.finish_reason == streamed[-1].finish_reason


def test_seeded_repeat_is_counted_by_the_cache_service(mesh, gateway):
    with mesh.channel(mesh.plan.cache.listen) as channel:
        cache = cache_pb2_grpc.CacheStub(channel)
        before = cache.Stats(cache_pb2.CacheStatsRequest(), timeout=10)
        sampling = common_pb2.SamplingParams(max_tokens=8, temperature=0.7, seed=42)  # seeded: cacheable
        a = gateway.Generate(gateway_pb2.GenerateRequest(prompt="Once upon a time", sampling=sampling), timeout=120)
        b = gateway.Generate(gateway_pb2.GenerateRequest(prompt="Once upon a time", sampling=sampling), timeout=120)
        after = cache.Stats(cache_pb2.CacheStatsRequest(), timeout=10)
        unseeded = common_pb2.SamplingParams(max_tokens=8, temperature=0.7)
        c = gateway.Generate(gateway_pb2.GenerateRequest(prompt="Once upon a time", sampling=unseeded), timeout=120)
        last = cache.Stats(cache_pb2.CacheStatsRequest(), timeout=10)
    assert not a.usage.from_response_cache and b.usage.from_response_cache
    assert b.text == a.text
    assert (after.lookups, after.hits, after.entries) == (before.lookups + 2, before.hits + 1, before.entries + 1)
    assert not c.usage.from_response_cache
    assert last.lookups == after.lookups  # a sampled request without a seed is not even looked up


def test_chinese_streams_without_broken_characters(mesh, gateway):
    chunks = _stream(gateway, messages=CHINESE, sampling=common_pb2.SamplingParams(max_tokens=40))
    assert all("\ufffd" not in c.text for c in chunks)
    text = "".join(c.text for c in chunks)
    assert "北京" in text
    tokenizer = tokenizer_pb2_grpc.TokenizerStub(mesh.channel(mesh.plan.tokenizer.listen))
    ids = [t for c in chunks for t in c.token_ids]
    assert text == tokenizer.Decode(tokenizer_pb2.DecodeRequest(token_ids=ids), timeout=10).text
    # Some message carried tokens but no text: a character was held until it was whole.
    assert any(c.token_ids and not c.text for c in chunks)


def test_logprobs_come_with_each_token(gateway):
    sampling = common_pb2.SamplingParams(max_tokens=12, logprobs=True)
    chunks = _stream(gateway, messages=FRANCE, sampling=sampling)
    for c in chunks:
        assert len(c.logprobs) == len(c.token_ids)
    values = [lp for c in chunks for lp in c.logprobs]
    assert values and all(lp <= 0 for lp in values)
    unary = gateway.Generate(gateway_pb2.GenerateRequest(messages=FRANCE, sampling=sampling), timeout=60)
    assert list(unary.logprobs) == pytest.approx(values) and unary.usage.from_response_cache


def test_stop_string_ends_the_answer_before_it(gateway):
    sampling = common_pb2.SamplingParams(max_tokens=48, stop=["Paris"])
    chunks = _stream(gateway, messages=FRANCE, sampling=sampling)
    text = "".join(c.text for c in chunks)
    assert "Paris" not in text and text.startswith("The capital of France is")
    assert chunks[-1].finish_reason == "stop"


def test_concurrent_requests_get_the_answers_they_get_alone(gateway):
    prompts = ["Name a fruit.", "What is 2 + 2?", "Say hello in French.", "What color is the sky?",
               "Write a haiku about rain.", "List three animals."]

    def ask(p: str, max_tokens: int):
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.5, seed=9)
        return gateway.Generate(gateway_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content=p)], sampling=sampling), timeout=120)

    alone = [ask(p, 20) for p in prompts]
    # One more token allowed: another cache key, so these really run, all at once.
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: ask(p, 21), prompts))
    for a, b in zip(alone, together):
        assert not a.usage.from_response_cache and not b.usage.from_response_cache
        # Same seed: the shorter answer is a prefix of the longer one.
        assert list(b.token_ids[: len(a.token_ids)]) == list(a.token_ids)


@pytest.mark.parametrize("request_,fragment", [
    (gateway_pb2.GenerateRequest(prompt=""), "empty"),
    (gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="wizard", content="hi")]), "role"),
    (gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=100000)), "max_tokens"),
    (gateway_pb2.GenerateRequest(prompt="hello " * 9000), "context"),
])
def test_bad_input_gets_invalid_argument(gateway, request_, fragment):
    for call in (gateway.Generate, lambda r, timeout: list(gateway.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.value.details()


def test_every_service_answers_health_and_reflection(mesh):
    expected = {
        "gateway": "llmmesh.v1.Gateway",
        "tokenizer": "llmmesh.v1.Tokenizer",
        "cache": "llmmesh.v1.Cache",
        "shard-0": "llmmesh.v1.ModelShard",
        "shard-1": "llmmesh.v1.ModelShard",
    }
    specs = {s.name: s for s in [mesh.plan.gateway, *mesh.plan.backends]}
    for name, service in expected.items():
        with mesh.channel(specs[name].listen) as channel:  # reflection, like every call but health, needs the token
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                      timeout=10)
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names, name


def test_one_request_is_one_trace_across_the_four_services(mesh, gateway):
    request_id = f"trace-{time.time_ns()}"
    sampling = common_pb2.SamplingParams(max_tokens=6, temperature=0.3, seed=time.time_ns() % 10**6)
    _stream(gateway, messages=FRANCE, sampling=sampling, request_id=request_id)

    wanted = {"llmmesh-gateway", "llmmesh-tokenizer", "llmmesh-cache", "llmmesh-model_shard"}

    def trace_of_request():  # spans are written as each process ends them: complete once all four wrote
        spans = load_spans(mesh.trace_dir)
        roots = [s for s in spans if s["name"] == "/llmmesh.v1.Gateway/GenerateStream"
                 and s["attributes"].get("llmmesh.request_id") == request_id]
        trace = [s for s in spans if roots and s["context"]["trace_id"] == roots[0]["context"]["trace_id"]]
        complete = (wanted <= {s["resource"]["attributes"]["service.name"] for s in trace}
                    and {"queue", "prefill", "decode", "detokenize"} <= {s["name"] for s in trace})
        return (roots, trace) if complete else None

    found = wait_for(trace_of_request)
    assert found, "the request's trace never showed all four services"
    roots, trace = found
    services = {s["resource"]["attributes"]["service.name"] for s in trace}
    names = {s["name"] for s in trace}
    assert len(roots) == 1
    assert wanted <= services, services
    assert {"/llmmesh.v1.Tokenizer/Encode", "/llmmesh.v1.Cache/GetResponse",
            "/llmmesh.v1.ModelShard/Generate", "queue", "prefill", "decode", "detokenize", "cache.lookup"} <= names
    ids = {s["context"]["span_id"] for s in trace}
    root = roots[0]
    for s in trace:
        if s is not root:
            assert s["parent_id"] in ids, f"{s['name']} has a parent outside the trace"
    by_id = {s["context"]["span_id"]: s for s in trace}

    def parent(span: dict) -> dict:
        return by_id[span["parent_id"]]

    # shard server span <- gateway's client span <- the gateway's server span (the root)
    shard_server = next(s for s in trace if s["name"] == "/llmmesh.v1.ModelShard/Generate" and s["kind"] == "SpanKind.SERVER")
    assert parent(shard_server)["kind"] == "SpanKind.CLIENT"
    assert parent(parent(shard_server)) is root
    # The response-cache lookup runs beside the shard call, not before it: no round trip of its own.
    lookup = next(s for s in trace if s["name"] == "cache.lookup")
    assert parent(shard_server)["start_time"] < lookup["end_time"]
    for name in ("queue", "prefill", "decode"):
        assert parent(next(s for s in trace if s["name"] == name)) is shard_server
    # Text is made in the gateway, from the vocabulary it holds: no message to the tokenizer per step.
    detokenize = next(s for s in trace if s["name"] == "detokenize")
    assert parent(detokenize) is root and detokenize["attributes"]["llmmesh.detokenized_in"] == "gateway"
    assert metric(mesh.plan.tokenizer.metrics_port, "llmmesh_detokenize_streams_total") == 0


def test_shard_down_is_unavailable_fast(real_model_dir, mesh, tmp_path):
    """A gateway whose only shard address has nothing listening answers UNAVAILABLE, not a hang."""
    dead, port = free_port(), free_port()
    spec = ServiceSpec("gateway-dead", "services.gateway", f"127.0.0.1:{port}", 0,
                       ["--tokenizer", mesh.plan.tokenizer.listen, "--cache", "", "--shards", f"127.0.0.1:{dead}"])
    proc = subprocess.Popen(spec.argv(), cwd=Path(__file__).resolve().parent.parent,
                            stdout=open(tmp_path / "gateway.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(spec.listen, 60, proc, service=LIVENESS_SERVICE)  # it runs, and is not ready:
        with grpc.insecure_channel(spec.listen) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no shard said it serves
            stub = gateway_pb2_grpc.GatewayStub(channel)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(gateway_pb2.GenerateRequest(prompt="hi"), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shard" in err.value.details()
            assert time.monotonic() - start < 10
    finally:
        proc.terminate()
        proc.wait(30)


def _shard_kv_used(mesh) -> list[float]:
    return [metric(spec.metrics_port, "llmmesh_kv_blocks_used_ratio") for spec in mesh.plan.shards]


def test_a_passed_deadline_ends_generation_and_frees_kv(mesh, gateway):
    request = gateway_pb2.GenerateRequest(prompt="Count from one to one thousand: one, two,",
                                          sampling=common_pb2.SamplingParams(max_tokens=3000))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(gateway.GenerateStream(request, timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    # The shard saw the deadline too: its blocks return to zero within a few engine steps.
    wait_for(lambda: not any(_shard_kv_used(mesh)), timeout=10, interval=0.05)
    assert _shard_kv_used(mesh) == [0.0, 0.0]


def test_a_client_cancel_mid_stream_frees_kv(mesh, gateway):
    request = gateway_pb2.GenerateRequest(prompt="List every number from one to one thousand:",
                                          sampling=common_pb2.SamplingParams(max_tokens=3000))
    stream = gateway.GenerateStream(request, timeout=60)
    next(stream)
    assert any(_shard_kv_used(mesh))  # the request holds blocks while it streams
    stream.cancel()
    # The gateway cancels the shard call; the engine frees the blocks at its next step.
    wait_for(lambda: not any(_shard_kv_used(mesh)), timeout=10, interval=0.05)
    assert _shard_kv_used(mesh) == [0.0, 0.0]


def test_structured_output_over_grpc(gateway):
    import json
    import re

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    sampling = common_pb2.SamplingParams(max_tokens=40, structured=common_pb2.StructuredOutput(
        json_schema=json.dumps(schema)))
    chunks = _stream(gateway, messages=FRANCE, sampling=sampling)
    answer = json.loads("".join(c.text for c in chunks))
    assert set(answer) == {"capital"} and chunks[-1].finish_reason == "stop"
    regex = common_pb2.SamplingParams(max_tokens=16, structured=common_pb2.StructuredOutput(regex="[0-9]{4}"))
    reply = gateway.Generate(gateway_pb2.GenerateRequest(prompt="The year:", sampling=regex), timeout=60)
    assert re.fullmatch("[0-9]{4}", reply.text)
    for structured, fragment in ((common_pb2.StructuredOutput(json_schema="{oops"), "not JSON"),
                                 (common_pb2.StructuredOutput(regex="[z-a]"), "regex"),
                                 (common_pb2.StructuredOutput(choice=common_pb2.ChoiceList()), "one or more")):
        with pytest.raises(grpc.RpcError) as err:
            gateway.Generate(gateway_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(
                max_tokens=4, structured=structured)), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


def test_tool_calls_over_grpc(gateway):
    import json

    import jsonschema

    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
               "required": ["city"], "additionalProperties": False}
    request = dict(messages=[common_pb2.ChatMessage(role="user", content="What's the weather in Paris?")],
                   tools=[common_pb2.Tool(name="get_weather", description="Weather in a city",
                                          parameters=json.dumps(weather)), common_pb2.Tool(name="get_time")],
                   tool_choice=common_pb2.ToolChoice(function="get_weather"),
                   sampling=common_pb2.SamplingParams(max_tokens=60, temperature=0.7, seed=5))
    chunks = _stream(gateway, **request)
    calls = [call for c in chunks for call in c.tool_calls]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), weather)
    assert "".join(c.text for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"
    # Unary: the same seeded call, whole, in tool_calls.
    reply = gateway.Generate(gateway_pb2.GenerateRequest(**request), timeout=120)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [(c.name, c.arguments) for c in calls]
    assert reply.finish_reason == "tool_calls"
    # The call and its result in the history: the model answers in text.
    history = [*request["messages"], common_pb2.ChatMessage(role="assistant", tool_calls=calls),
               common_pb2.ChatMessage(role="tool", tool_call_id=calls[0].id, content='{"celsius": 21}')]
    answer = gateway.Generate(gateway_pb2.GenerateRequest(
        messages=history, tools=request["tools"], tool_choice=common_pb2.ToolChoice(none=True),
        sampling=common_pb2.SamplingParams(max_tokens=24)), timeout=120)
    assert answer.text and not answer.tool_calls and answer.finish_reason in ("stop", "length")
    with pytest.raises(grpc.RpcError) as err:
        gateway.Generate(gateway_pb2.GenerateRequest(**{**request, "tool_choice": common_pb2.ToolChoice(
            function="launch")}), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not among the tools" in err.value.details()
