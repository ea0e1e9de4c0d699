"""Checks on a client's GenerateRequest, with messages a caller can act on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmmesh.v1 import common_pb2, gateway_pb2

CHAT_ROLES = ("system", "user", "assistant", "tool")
REQUEST_ID = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a label that cannot forge a log line
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as OpenAI's


class InvalidRequest(ValueError):
    """Becomes INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # largest max_tokens a client may ask for
    default_max_tokens: int = 256
    max_prompt_chars: int = 1 << 20
    max_messages: int = 256
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_request_id_chars: int = 128
    max_logit_bias: int = 300  # entries, as OpenAI allows
    max_stop_token_ids: int = 64
    max_n: int = 16  # choices per request
    max_top_logprobs: int = 20  # as OpenAI's (the shard's own bound too)
    max_tools: int = 128  # as OpenAI's
    max_cache_salt_chars: int = 1024  # vLLM suggests 43 (256 random bits in base64)


def check_request(request: gateway_pb2.GenerateRequest, limits: Limits) -> None:
    has_prompt, has_messages = bool(request.prompt), len(request.messages) > 0
    if has_prompt and has_messages:
        raise InvalidRequest("send either prompt or messages, not both")
    if not has_prompt and not has_messages:
        raise InvalidRequest("the request is empty: send a non-empty prompt or messages")
    if has_prompt and not request.prompt.strip():
        raise InvalidRequest("prompt is blank")
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(f"{len(request.messages)} messages; at most {limits.max_messages}")
    chars = (len(request.prompt) + sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls)
                                       for m in request.messages)
             + sum(len(t.description) + len(t.parameters) for t in request.tools))
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(f"the prompt is {chars} characters; at most {limits.max_prompt_chars}")
    for i, m in enumerate(request.messages):
        check_message(i, m)
    check_tools(request, limits)
    if len(request.request_id) > limits.max_request_id_chars:
        raise InvalidRequest(f"request_id is longer than {limits.max_request_id_chars} characters")
    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        raise InvalidRequest("request_id may hold only visible ASCII characters (no spaces or control characters)")
    if len(request.cache_salt) > limits.max_cache_salt_chars:
        raise InvalidRequest(f"cache_salt is longer than {limits.max_cache_salt_chars} characters")
    check_sampling(request.sampling, limits)


def check_message(i: int, m: common_pb2.ChatMessage) -> None:
    if m.role not in CHAT_ROLES:
        raise InvalidRequest(f"messages[{i}].role is {m.role!r}; expected one of {', '.join(CHAT_ROLES)}")
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequest(f"messages[{i}] is a tool result without tool_call_id (the id of the call it answers)")
    if m.tool_calls and m.role != "assistant":
        raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls")
    for j, call in enumerate(m.tool_calls):
        if not FUNCTION_NAME.fullmatch(call.name):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}].name must be 1-64 letters, digits, _ or -")
        if not isinstance(_json(call.arguments, f"messages[{i}].tool_calls[{j}].arguments"), dict):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}].arguments must be a JSON object")


def check_tools(request: gateway_pb2.GenerateRequest, limits: Limits) -> None:
    choice = request.tool_choice.WhichOneof("kind") if request.HasField("tool_choice") else None
    if not request.tools:
        if choice not in (None, "none"):
            raise InvalidRequest(f"tool_choice {choice} needs tools")
        return
    if not request.messages:
        raise InvalidRequest("tools need a chat request (messages, not prompt)")
    if len(request.tools) > limits.max_tools:
        raise InvalidRequest(f"{len(request.tools)} tools; at most {limits.max_tools}")
    names = set()
    for i, tool in enumerate(request.tools):
        if not FUNCTION_NAME.fullmatch(tool.name):
            raise InvalidRequest(f"tools[{i}].name must be 1-64 letters, digits, _ or -, got {tool.name!r}")
        if tool.name in names:
            raise InvalidRequest(f"tools[{i}]: two tools are named {tool.name!r}")
        names.add(tool.name)
        if tool.parameters and not isinstance(_json(tool.parameters, f"tools[{i}].parameters"), dict):
            raise InvalidRequest(f"tools[{i}].parameters must be a JSON Schema (a JSON object)")
    if choice == "function" and request.tool_choice.function not in names:
        raise InvalidRequest(f"tool_choice names {request.tool_choice.function!r}, which is not among the tools "
                             f"({', '.join(sorted(names))})")
    if choice != "none" and request.sampling.HasField("structured"):
        raise InvalidRequest("tools and a structured output cannot be combined: tool calls are constrained by "
                             "their own grammar; send tool_choice none, or no structured output")


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not JSON: {exc}") from None


def check_sampling(s: common_pb2.SamplingParams, limits: Limits) -> None:
    if s.max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens is {s.max_tokens}; this server allows at most {limits.max_tokens}")
    if not s.temperature >= 0 or s.temperature > 100:  # also refuses NaN
        raise InvalidRequest(f"temperature must be in [0, 100], got {s.temperature}")
    if not 0 <= s.top_p <= 1:
        raise InvalidRequest(f"top_p must be in [0, 1], got {s.top_p}")
    if not 0 <= s.min_p <= 1:
        raise InvalidRequest(f"min_p must be in [0, 1], got {s.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(s, name) <= 2:
            raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(s, name)}")
    if len(s.logit_bias) > limits.max_logit_bias:
        raise InvalidRequest(f"logit_bias has {len(s.logit_bias)} entries; at most {limits.max_logit_bias}")
    bad = next(((t, b) for t, b in s.logit_bias.items() if not -100 <= b <= 100), None)
    if bad is not None:
        raise InvalidRequest(f"logit_bias[{bad[0]}] must be in [-100, 100], got {bad[1]}")
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequest(f"{len(s.stop_token_ids)} stop_token_ids; at most {limits.max_stop_token_ids}")
    if s.max_tokens and s.min_tokens > s.max_tokens:
        raise InvalidRequest(f"min_tokens ({s.min_tokens}) is above max_tokens ({s.max_tokens})")
    if s.n > limits.max_n:
        raise InvalidRequest(f"n is {s.n}; this server allows at most {limits.max_n} choices per request")
    if s.top_logprobs > limits.max_top_logprobs:
        raise InvalidRequest(f"top_logprobs must be in [0, {limits.max_top_logprobs}], got {s.top_logprobs}")
    if s.top_logprobs and not (s.logprobs or s.prompt_logprobs):
        raise InvalidRequest("top_logprobs needs logprobs (or prompt_logprobs)")
    if not s.repetition_penalty >= 0 or s.repetition_penalty > 10:
        raise InvalidRequest(f"repetition_penalty must be in (0, 10] (0 = off), got {s.repetition_penalty}")
    check_structured(s)
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"{len(s.stop)} stop strings; at most {limits.max_stop_strings}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"stop[{i}] must be 1..{limits.max_stop_chars} characters")


def resolve_max_tokens(s: common_pb2.SamplingParams, prompt_tokens: int, max_model_len: int, limits: Limits) -> int:
    """The max_tokens the shard runs with, once the prompt's length is known."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise InvalidRequest(f"the prompt is {prompt_tokens} tokens; the model's context is {max_model_len} tokens")
    if s.max_tokens == 0:
        if s.min_tokens > min(limits.default_max_tokens, room):
            raise InvalidRequest(f"min_tokens ({s.min_tokens}) is above the default max_tokens; set max_tokens")
        return min(limits.default_max_tokens, room)
    if s.max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({s.max_tokens}) exceeds the model's context "
            f"of {max_model_len} tokens; lower max_tokens to {room} or shorten the prompt"
        )
    return s.max_tokens


def is_deterministic(s: common_pb2.SamplingParams) -> bool:
    return s.temperature == 0 or s.HasField("seed")


def check_structured(s: common_pb2.SamplingParams) -> None:
    """What can be told without compiling (the shard compiles, and refuses what does not compile)."""
    kind = s.structured.WhichOneof("kind") if s.HasField("structured") else None
    if kind == "json_schema":
        try:
            schema = json.loads(s.structured.json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"structured.json_schema is not JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("structured.json_schema must be a JSON Schema (a JSON object)")
    elif kind == "choice":
        if not s.structured.choice.options or not all(s.structured.choice.options):
            raise InvalidRequest("structured.choice needs one or more non-empty options")
    elif kind in ("regex", "lark", "gbnf") and not getattr(s.structured, kind):
        raise InvalidRequest(f"structured.{kind} is empty")
