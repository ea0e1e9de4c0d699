"""Anthropic's Messages API request bodies, as llmmesh.v1's GenerateRequest: translation only.

Served: `system` (a string or text blocks), `messages` of roles user and assistant whose content is a
string or blocks of type text, tool_use (assistant) and tool_result (user), `max_tokens`,
`stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata.user_id`, `tools` (custom tools:
name, description, input_schema) and `tool_choice` (auto, any, tool, none; disable_parallel_tool_use).
A block's `cache_control` is accepted: the mesh reuses every prompt's cached prefix blocks anyway.
Everything else (images, documents, thinking, server tools, a final assistant message to continue)
is refused with a 400 naming it, never dropped.

The conversation becomes the chat the OpenAI front would send: system first; an assistant's text
and calls one assistant message; each tool_result a `tool` message answering its tool_use id (its
text after "Error: " when is_error is set).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.openai_requests import UINT32_MAX, BadParam, _Validated

BLOCK_FIELDS = {
    "text": {"type", "text", "cache_control", "citations"},
    "tool_use": {"type", "id", "name", "input", "cache_control"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
}
BLOCKS_OF = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use"), "system": ("text",),
             "tool_result": ("text",)}  # the blocks each place may hold
TOOL_FIELDS = {"type", "name", "description", "input_schema", "cache_control"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = None


class CountTokensRequest(_Validated):
    """The body of /v1/messages/count_tokens: what makes the prompt."""

    model_config = ConfigDict(extra="forbid")  # a field not served here is refused by name
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None  # accepted, as on blocks


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=UINT32_MAX)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    metadata: Metadata | None = None


def generate_request(body: CountTokensRequest) -> gateway_pb2.GenerateRequest:
    """The chat (and, for a MessagesRequest, the sampling) of an Anthropic body."""
    _cache_control(body.model_dump(include={"cache_control"}), "body")
    request = gateway_pb2.GenerateRequest(messages=_system(body.system))
    for i, message in enumerate(body.messages):
        request.messages.extend(_messages(i, message))
    if body.messages[-1].role == "assistant":
        raise BadParam("the last message is the assistant's: continuing an assistant message (prefill) is not "
                       "served; end with a user message", f"messages.{len(body.messages) - 1}")
    request.tools.extend(_tool(i, t) for i, t in enumerate(body.tools or ()))
    if body.tool_choice is not None:
        _tool_choice(body.tool_choice, request)
    if isinstance(body, MessagesRequest):
        request.sampling.CopyFrom(common_pb2.SamplingParams(
            max_tokens=body.max_tokens, stop=body.stop_sequences or [],
            temperature=1.0 if body.temperature is None else body.temperature,  # Anthropic's default
            top_p=body.top_p or 0.0, top_k=body.top_k or 0))
    return request


def _system(system: str | list[dict[str, Any]] | None) -> list[common_pb2.ChatMessage]:
    if isinstance(system, list):
        system = "".join(_text(b, f"system.{j}") for j, b in enumerate(_blocks(system, "system", "system")))
    return [common_pb2.ChatMessage(role="system", content=system)] if system else []


def _messages(i: int, message: MessageIn) -> list[common_pb2.ChatMessage]:
    """One Anthropic message as chat messages: tool results each their own `tool` message, in order
    with the text around them."""
    if isinstance(message.content, str):
        return [common_pb2.ChatMessage(role=message.role, content=message.content)]
    where = f"messages.{i}.content"
    blocks = _blocks(message.content, message.role, where)
    if message.role == "assistant":
        text = "".join(_text(b, f"{where}.{j}") for j, b in enumerate(blocks) if b["type"] == "text")
        calls = [_call(b, f"{where}.{j}") for j, b in enumerate(blocks) if b["type"] == "tool_use"]
        return [common_pb2.ChatMessage(role="assistant", content=text, tool_calls=calls)]
    out: list[common_pb2.ChatMessage] = []
    for j, block in enumerate(blocks):
        if block["type"] == "tool_result":
            out.append(_result(block, f"{where}.{j}"))
        elif out and out[-1].role == "user":
            out[-1].content += _text(block, f"{where}.{j}")
        else:
            out.append(common_pb2.ChatMessage(role="user", content=_text(block, f"{where}.{j}")))
    return out


def _blocks(blocks: list[dict[str, Any]], place: str, where: str) -> list[dict[str, Any]]:
    """The blocks, each of a type served in this place (BLOCKS_OF) and with no field that is not."""
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind not in BLOCKS_OF[place]:
            raise BadParam(f"{where}.{j}: content blocks of type {kind!r} are not served here ({place} content may "
                           f"hold {', '.join(BLOCKS_OF[place])})", f"{where}.{j}.type")
        extra = sorted(block.keys() - BLOCK_FIELDS[kind])
        if extra:
            raise BadParam(f"{where}.{j}: {', '.join(extra)} not served on {kind} blocks", f"{where}.{j}.{extra[0]}")
        _cache_control(block, f"{where}.{j}")
    return blocks


def _cache_control(block: dict[str, Any], where: str) -> None:
    control = block.get("cache_control")
    if control is not None and (not isinstance(control, dict) or control.get("type") != "ephemeral"):
        raise BadParam(f'{where}.cache_control must be {{"type": "ephemeral"}}', f"{where}.cache_control")


def _text(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise BadParam(f"{where}.text must be a string", f"{where}.text")
    if block.get("citations"):
        raise BadParam(f"{where}.citations are not served", f"{where}.citations")
    return block["text"]


def _call(block: dict[str, Any], where: str) -> common_pb2.ToolCall:
    for name in ("id", "name"):
        if not isinstance(block.get(name), str):
            raise BadParam(f"{where}.{name} must be a string", f"{where}.{name}")
    if not isinstance(block.get("input"), dict):
        raise BadParam(f"{where}.input must be an object (the call's arguments)", f"{where}.input")
    return common_pb2.ToolCall(id=block["id"], name=block["name"],
                               arguments=json.dumps(block["input"], ensure_ascii=False))


def _result(block: dict[str, Any], where: str) -> common_pb2.ChatMessage:
    if not isinstance(block.get("tool_use_id"), str):
        raise BadParam(f"{where}.tool_use_id must be a string (the id of the tool_use it answers)",
                       f"{where}.tool_use_id")
    content = block.get("content", "")
    if isinstance(content, list):
        content = "".join(_text(b, f"{where}.content.{k}")
                          for k, b in enumerate(_blocks(content, "tool_result", f"{where}.content")))
    elif not isinstance(content, str):
        raise BadParam(f"{where}.content must be a string or text blocks", f"{where}.content")
    if block.get("is_error"):  # the model is told, as it would read a failed call's output
        content = f"Error: {content}"
    return common_pb2.ChatMessage(role="tool", content=content, tool_call_id=block["tool_use_id"])


def _tool(i: int, tool: dict[str, Any]) -> common_pb2.Tool:
    where = f"tools.{i}"
    if tool.get("type", "custom") not in ("custom", None):
        raise BadParam(f"{where}: tools of type {tool['type']!r} (Anthropic's server and client tools) are not "
                       "served; define a custom tool with name and input_schema", f"{where}.type")
    extra = sorted(tool.keys() - TOOL_FIELDS)
    if extra:
        raise BadParam(f"{where}: {', '.join(extra)} not served on tools", f"{where}.{extra[0]}")
    _cache_control(tool, where)
    name, description, schema = tool.get("name"), tool.get("description", ""), tool.get("input_schema")
    if not isinstance(name, str):
        raise BadParam(f"{where}.name must be a string", f"{where}.name")
    if not isinstance(description, str):
        raise BadParam(f"{where}.description must be a string", f"{where}.description")
    if not isinstance(schema, dict):
        raise BadParam(f"{where}.input_schema must be a JSON Schema object", f"{where}.input_schema")
    return common_pb2.Tool(name=name, description=description, parameters=json.dumps(schema))


def _tool_choice(choice: dict[str, Any], request: gateway_pb2.GenerateRequest) -> None:
    kind, extra = choice.get("type"), sorted(choice.keys() - {"type", "name", "disable_parallel_tool_use"})
    if extra:
        raise BadParam(f"tool_choice: {', '.join(extra)} not served", f"tool_choice.{extra[0]}")
    if kind == "tool" and isinstance(choice.get("name"), str):
        request.tool_choice.function = choice["name"]
    elif kind in CHOICES and "name" not in choice:
        setattr(request.tool_choice, CHOICES[kind], True)
    else:
        raise BadParam('tool_choice must be {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}',
                       "tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None:
        if not isinstance(disable, bool):
            raise BadParam("tool_choice.disable_parallel_tool_use must be true or false",
                           "tool_choice.disable_parallel_tool_use")
        request.parallel_tool_calls = not disable
