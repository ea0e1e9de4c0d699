"""Anthropic's Messages API on the HTTP front, driven by the official `anthropic` package, with API keys
on: the same gateway process and keys as tests/test_openai.py, over the shared mesh with the real model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anthropic
import jsonschema
import pytest

from .test_openai import KEY, MODEL, client, http_gateway  # noqa: F401 - fixtures shared with the OpenAI tests

pytestmark = pytest.mark.e2e
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                            "required": ["city"], "additionalProperties": False}}
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather like in Paris today?"}]
GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the API still takes them


@pytest.fixture(scope="module")
def claude(http_gateway):  # noqa: F811
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{http_gateway['http_port']}", api_key=KEY, max_retries=0,
                               timeout=120)


def _post(http_gateway, path: str, payload: dict, headers: dict) -> tuple[int, dict]:  # noqa: F811
    request = urllib.request.Request(f"http://127.0.0.1:{http_gateway['http_port']}{path}", method="POST",
                                     data=json.dumps(payload).encode(),
                                     headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _prompt_tokens(message) -> int:
    return message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_create_answers_as_the_openai_front_does(claude, client):  # noqa: F811
    system = "Answer in one short sentence."
    reply = claude.messages.create(model=MODEL, max_tokens=32, extra_body=GREEDY, system=[{"type": "text", "text": system}],
                                   messages=[{"role": "user", "content": [{"type": "text", "text": FRANCE[0]["content"]}]}])
    chat = client.chat.completions.create(model=MODEL, max_tokens=32, temperature=0,
                                          messages=[{"role": "system", "content": system}, *FRANCE])
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL and reply.id.startswith("msg_")
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == chat.choices[0].message.content and "Paris" in reply.content[0].text
    assert reply.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[chat.choices[0].finish_reason]
    assert reply.stop_sequence is None
    assert _prompt_tokens(reply) == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens


def test_stream_sends_the_events_in_order_and_the_unary_text(claude):
    kwargs = dict(model=MODEL, max_tokens=24, extra_body=GREEDY, messages=[
        {"role": "user", "content": "Name three rivers in Europe."}])
    whole = claude.messages.create(**{**kwargs, "extra_body": {**GREEDY, "top_k": 1}})  # not the cached answer
    with claude.messages.stream(**kwargs) as stream:
        kinds = [e.type for e in stream if e.type not in ("text", "input_json")]  # the SDK's own derived events
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert kinds.count("content_block_delta") >= 3 and set(kinds[2:-3]) == {"content_block_delta"}
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert _prompt_tokens(final) == _prompt_tokens(whole)


def test_max_tokens_ends_with_stop_reason_max_tokens(claude):
    reply = claude.messages.create(model=MODEL, max_tokens=3, extra_body=GREEDY,
                                   messages=[{"role": "user", "content": "Tell me a long story about a dragon."}])
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 3


def test_stop_sequences_end_before_the_string_and_say_which(claude):
    kwargs = dict(model=MODEL, max_tokens=32, extra_body=GREEDY, messages=FRANCE)
    full = claude.messages.create(**kwargs).content[0].text
    assert "Paris" in full
    reply = claude.messages.create(**kwargs, stop_sequences=["Zanzibar", "Paris"])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "Paris"
    assert reply.content[0].text == full.split("Paris")[0]
    again = claude.messages.create(**kwargs, stop_sequences=["Zanzibar", "Paris"])  # from the response cache
    assert again.usage.cache_read_input_tokens == _prompt_tokens(again)
    assert (again.stop_reason, again.stop_sequence, again.content[0].text) == ("stop_sequence", "Paris",
                                                                               reply.content[0].text)
    with claude.messages.stream(**kwargs, stop_sequences=["Paris"]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "Paris"
    assert final.content[0].text == reply.content[0].text


def test_tool_round_trip(claude):
    kwargs = dict(model=MODEL, max_tokens=80, extra_body=GREEDY, tools=[WEATHER], messages=WEATHER_QUESTION)
    reply = claude.messages.create(**kwargs, tool_choice={"type": "tool", "name": "get_weather"})
    assert reply.stop_reason == "tool_use"
    call = reply.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["input_schema"])
    with claude.messages.stream(**kwargs, tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(call.name, call.input)]

    history = [*WEATHER_QUESTION, {"role": "assistant", "content": reply.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "21 C and sunny"}]}]}]
    answer = claude.messages.create(model=MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER], messages=history)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert any(b.type == "text" and b.text.strip() for b in answer.content) or answer.stop_reason == "tool_use"
    counted = claude.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=history)
    assert counted.input_tokens == _prompt_tokens(answer)


def test_count_tokens_is_the_prompts_token_count(claude, client):  # noqa: F811
    counted = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=FRANCE)
    chat = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                                          messages=[{"role": "system", "content": "Be brief."}, *FRANCE])
    assert counted.input_tokens == chat.usage.prompt_tokens > 0


def test_keys_are_the_openai_fronts_and_errors_are_anthropic_shaped(claude, http_gateway):  # noqa: F811
    base_url = f"http://127.0.0.1:{http_gateway['http_port']}"
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic.Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=FRANCE)
    assert err.value.status_code == 401
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"
    status, body = _post(http_gateway, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": FRANCE}, {})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=base_url, auth_token=KEY, api_key=None, max_retries=0)
    assert bearer.messages.count_tokens(model=MODEL, messages=FRANCE).input_tokens > 0
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=FRANCE)
    assert err.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("change, fragment", [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ({"messages": [*FRANCE, {"role": "assistant", "content": "The capital is"}]}, "prefill"),
    ({"temperature": 1.5}, "temperature"),
])
def test_what_is_not_served_is_a_400_naming_it(http_gateway, change, fragment):  # noqa: F811
    payload = {"model": MODEL, "max_tokens": 8, "messages": FRANCE, **change}
    payload = {k: v for k, v in payload.items() if v is not None}
    status, body = _post(http_gateway, "/v1/messages", payload, {"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert status == 400 and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error" and fragment in body["error"]["message"]


def test_an_image_through_the_sdk_is_a_bad_request(claude):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert err.value.status_code == 400 and "image" in err.value.body["error"]["message"]


def test_a_conversation_becomes_the_chat_the_openai_front_sends():
    from services.gateway.anthropic_requests import MessagesRequest, generate_request

    body = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 5, "system": [{"type": "text", "text": "S"}],
                                           "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                                           "tools": [{"name": "f", "input_schema": {"type": "object"}}], "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "no", "is_error": True},
                                     {"type": "text", "text": "next", "cache_control": {"type": "ephemeral"}}]}]})
    request = generate_request(body)
    assert [(m.role, m.content, m.tool_call_id) for m in request.messages] == [
        ("system", "S", ""), ("user", "hi", ""), ("assistant", "ok", ""), ("tool", "Error: no", "t1"),
        ("user", "next", "")]
    assert [(c.id, c.name, c.arguments) for c in request.messages[2].tool_calls] == [("t1", "f", '{"a": 1}')]
    assert request.tool_choice.required and not request.parallel_tool_calls
    assert request.sampling.max_tokens == 5 and request.sampling.temperature == 1.0  # Anthropic's default


def test_blocks_follow_the_order_the_answer_made_them():
    from llmmesh.v1 import common_pb2, gateway_pb2
    from services.gateway.anthropic_http import Blocks

    blocks = Blocks()
    events = [*blocks.feed(gateway_pb2.GenerateStreamResponse(text="Let me look. ")),
              *blocks.feed(gateway_pb2.GenerateStreamResponse(tool_calls=[
                  common_pb2.ToolCall(id="c1", name="f", arguments='{"a": 1}')])),
              *blocks.feed(gateway_pb2.GenerateStreamResponse(
                  text="Done", finish_reason="stop", stop_sequence="END",
                  usage=common_pb2.Usage(prompt_tokens=10, completion_tokens=4, cached=8))),
              *blocks.finish()]
    assert [(e["type"], e.get("index")) for e in events] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    message = blocks.message("msg_1", MODEL)
    assert message["content"] == [{"type": "text", "text": "Let me look. "},
                                  {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
                                  {"type": "text", "text": "Done"}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")
    assert message["usage"] == {"input_tokens": 2, "output_tokens": 4, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 8}
