"""The OpenAI-compatible HTTP front, driven by the official `openai` package, with API keys on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from services.gateway.auth import hash_key
from services.launcher import wait_healthy

from services.trace_view import load_spans

from .conftest import free_ports, wait_for

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-0123456789"
MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _http(method: str, url: str, payload: dict | None = None) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def http_gateway(mesh, tmp_path_factory):
    """A second gateway over the shared mesh's services, with the HTTP API and API keys on."""
    root = tmp_path_factory.mktemp("openai")
    keys = root / "keys"
    keys.write_text(f"# tenant sha256(key)\nteam-a {hash_key(KEY)}\n")
    grpc_port, http_port = free_ports(2)
    p = mesh.plan
    log = open(root / "gateway.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--listen", f"127.0.0.1:{grpc_port}",
         "--http-listen", f"127.0.0.1:{http_port}", "--api-keys-file", str(keys), "--model-name", MODEL,
         "--tokenizer", p.tokenizer.listen, "--cache", p.cache.listen, "--shards", ",".join(s.listen for s in p.shards)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{grpc_port}", 60, proc)
        yield {"base_url": f"http://127.0.0.1:{http_port}/v1", "grpc": f"127.0.0.1:{grpc_port}", "http_port": http_port}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def client(http_gateway):
    return openai.OpenAI(base_url=http_gateway["base_url"], api_key=KEY, max_retries=0, timeout=120)


def test_chat_completion(client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=32, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")


def test_streamed_chat_deltas_join_to_the_unstreamed_text(client):
    question = [{"role": "user", "content": "Name three rivers in Europe."}]
    whole = client.chat.completions.create(model=MODEL, messages=question, max_tokens=40, temperature=0, seed=1)
    stream = client.chat.completions.create(model=MODEL, messages=question, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 3
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                      logprobs=1)
    choice = reply.choices[0]
    assert "Paris" in choice.text
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_n_choices_top_logprobs_and_echo_through_the_sdk(client):
    story = [{"role": "user", "content": "Write one sentence about the sea."}]
    reply = client.chat.completions.create(model=MODEL, messages=story, max_tokens=16, temperature=0.9, seed=21, n=3,
                                           logprobs=True, top_logprobs=4)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    for c in reply.choices:
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) == 4 for t in c.logprobs.content)
        assert all(t.top_logprobs[0].logprob >= t.logprob for t in c.logprobs.content)
    # Choice i is the request with seed + i.
    second = client.chat.completions.create(model=MODEL, messages=story, max_tokens=16, temperature=0.9, seed=22)
    assert second.choices[0].message.content == reply.choices[1].message.content

    stream = client.chat.completions.create(model=MODEL, messages=story, max_tokens=16, temperature=0.9, seed=21, n=3,
                                            stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {c.index: c.message.content for c in reply.choices}

    prompt = "The capital of France is"
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == echoed.usage.prompt_tokens + echoed.usage.completion_tokens
    assert "".join(lp.tokens) == echoed.choices[0].text
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_wrong_or_missing_key_is_401_and_serves_nothing(http_gateway):
    bad = openai.OpenAI(base_url=http_gateway["base_url"], api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, stream=True)
    status, body = _http("POST", f"{http_gateway['base_url']}/chat/completions", {"model": MODEL, "messages": FRANCE})
    assert status == 401 and "missing API key" in body["error"]["message"]


def test_grpc_front_uses_the_same_keys(http_gateway):
    import grpc

    from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(http_gateway["grpc"]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=4))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(request, timeout=60, metadata=[("authorization", f"Bearer {KEY}")])
        assert ok.usage.completion_tokens > 0


@pytest.mark.parametrize("kwargs,fragment", [
    ({"messages": FRANCE, "n": 17}, "at most 16 choices"),
    ({"messages": FRANCE, "n": 0}, "n:"),
    ({"messages": FRANCE, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
    ({"messages": FRANCE, "top_logprobs": 2}, "needs logprobs"),
    ({"messages": FRANCE, "logit_bias": {"99999999": 5}}, "outside the vocabulary"),
    ({"messages": FRANCE, "extra_body": {"min_tokens": 9}, "max_tokens": 4}, "min_tokens"),
    ({"messages": FRANCE, "max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": FRANCE, "temperature": 5}, "temperature"),
    ({"messages": []}, "empty"),
])
def test_bad_requests_are_400_with_a_reason(client, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert err.value.status_code == 400 and fragment in err.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=FRANCE, max_tokens=4)
    assert err.value.body["code"] == "model_not_found"


def test_health_endpoint(http_gateway):
    status, body = _http("GET", f"http://127.0.0.1:{http_gateway['http_port']}/health")
    assert status == 200 and body == {"status": "serving"}


def test_traceparent_on_http_continues_the_callers_trace(mesh, client):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, temperature=0.5, seed=77,
                                   extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    # The shared mesh's services write their spans to files: the caller's trace id reaches them.
    wanted = {"prefill", "/llmmesh.v1.Tokenizer/Encode", "/llmmesh.v1.ModelShard/Generate"}

    def names():
        return {s["name"] for s in load_spans(mesh.trace_dir) if s["context"]["trace_id"] == "0x" + trace_id}

    wait_for(lambda: wanted <= names())
    assert wanted <= names()


def test_logit_bias_and_openai_penalties_are_served(client, real_model_dir):
    from services.tokenizer.text import TextTokenizer

    tok = TextTokenizer(real_model_dir)
    river = tok.encode(" river")[-1]
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0,
                                      logit_bias={str(river): 100})
    assert reply.choices[0].text == tok.decode([river] * 3)
    plain = client.completions.create(model=MODEL, prompt="One, two, three, one, two,", max_tokens=12, temperature=0)
    penalised = client.completions.create(model=MODEL, prompt="One, two, three, one, two,", max_tokens=12,
                                          temperature=0, frequency_penalty=2, presence_penalty=2)
    assert penalised.choices[0].text != plain.choices[0].text  # the same greedy request, answered differently
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, presence_penalty=3)
    assert err.value.status_code == 400 and "presence_penalty" in err.value.body["message"]


def test_structured_outputs_through_the_sdk(client):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
        population_millions: int = Field(ge=0, le=50)

    question = [{"role": "user", "content": "Give me a city as JSON."}]
    parsed = client.chat.completions.parse(model=MODEL, messages=question, response_format=City, max_tokens=120,
                                           temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, City)
    assert parsed.choices[0].finish_reason == "stop"
    anything = client.chat.completions.create(model=MODEL, messages=question, max_tokens=60, temperature=0,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    picked = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, temperature=0.7, seed=3,
                                            extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]})
    assert picked.choices[0].message.content in ("Paris", "Lyon", "Nice")
    code = client.completions.create(model=MODEL, prompt="A product code:", max_tokens=12, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{4}", code.choices[0].text)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs a schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "send one structured output"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "unclosed group"),
    ({"extra_body": {"guided_json": {"type": "frobnicate"}}}, "frobnicate"),
    ({"extra_body": {"guided_choice": []}}, "non-empty list"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]},
     "frobnicate"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
        "name": "g"}}}, "not among the tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     "cannot be combined"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, "send tools"),
])
def test_bad_structured_outputs_and_tool_requests_are_400(client, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, **kwargs)
    assert err.value.status_code == 400 and fragment in err.value.body["message"]


def test_tools_on_the_completions_endpoint_are_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"tools": [
            {"type": "function", "function": {"name": "f"}}]})
    assert err.value.status_code == 400 and "/v1/chat/completions" in err.value.body["message"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"], "additionalProperties": False}}}
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather like in Paris today?"}]


def _valid_call(call) -> dict:
    import jsonschema

    tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_round_trip_through_the_sdk(client, tool_choice):
    tools = [WEATHER_TOOL, TIME_TOOL]
    reply = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, tools=tools, tool_choice=tool_choice,
                                           parallel_tool_calls=False, max_tokens=80, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    assert len(message.tool_calls) == 1 and message.tool_calls[0].type == "function"
    call = message.tool_calls[0]
    assert call.function.name == "get_weather" and _valid_call(call)["city"] == "Paris"
    history = [*WEATHER_QUESTION, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21, "sky": "sunny"})}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=48, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    for later in answer.choices[0].message.tool_calls or ():
        _valid_call(later)


def test_streamed_tool_calls_are_deltas_the_sdk_gathers(client):
    kwargs = dict(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                  max_tokens=90, temperature=0.8, seed=11)
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion()
    whole = client.chat.completions.create(**kwargs)
    calls = streamed.choices[0].message.tool_calls
    assert calls and streamed.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    for call in calls:
        _valid_call(call)


def test_auto_tool_choice_answers_in_text_or_in_valid_calls(client):
    questions = [WEATHER_QUESTION, [{"role": "user", "content": "Call get_time for Europe/Paris."}],
                 [{"role": "user", "content": "Say hello."}]]
    for question in questions:
        reply = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER_TOOL, TIME_TOOL],
                                               max_tokens=60, temperature=0)
        choice = reply.choices[0]
        assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
        assert choice.message.content or choice.message.tool_calls
        for call in choice.message.tool_calls or ():
            _valid_call(call)
