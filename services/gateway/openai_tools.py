"""OpenAI's tool calling on the chat endpoint, as llmmesh.v1's tools (services/gateway/tools.py does the work).

In: `tools` ([{"type": "function", "function": {name, description, parameters, strict}}]), `tool_choice`
("none" | "auto" | "required" | {"type": "function", "function": {"name"}}), `parallel_tool_calls`, and
in the history assistant messages with `tool_calls` and `role: "tool"` results with `tool_call_id`.
`strict` is accepted either way: every call is held to its function's parameters. The legacy
`functions` / `function_call` are refused with a pointer to `tools`.

Out: `message.tool_calls` with `finish_reason: "tool_calls"` (content null when the answer is only calls);
streamed, one `delta.tool_calls` entry per call once the call is whole (id, name and all its arguments).
"""

from __future__ import annotations

import json
from typing import Any

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.openai_requests import BadParam


def add_tools(body: Any, request: gateway_pb2.GenerateRequest) -> None:
    """The body's tool fields onto the gRPC request."""
    extra = body.model_extra or {}
    for legacy in ("functions", "function_call"):
        if extra.get(legacy) is not None:
            raise BadParam(f"{legacy} is the deprecated form of tools; send tools and tool_choice instead", legacy)
    tools = extra.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadParam("tools must be a list", "tools")
        request.tools.extend(_tool(i, t) for i, t in enumerate(tools))
    choice = extra.get("tool_choice")
    if choice is not None:
        request.tool_choice.CopyFrom(_tool_choice(choice))
    parallel = extra.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise BadParam("parallel_tool_calls must be true or false", "parallel_tool_calls")
        request.parallel_tool_calls = parallel


def refuse_tools_on_completions(body: Any) -> None:
    """Tools are a chat feature: /v1/completions says so rather than ignore them."""
    extra = body.model_extra or {}
    for name in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"):
        if extra.get(name) is not None:
            raise BadParam(f"{name} is served on /v1/chat/completions, not on /v1/completions", name)


def _tool(i: int, tool: Any) -> common_pb2.Tool:
    where = f"tools.{i}"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise BadParam(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
    function = tool["function"]
    name, description = function.get("name"), function.get("description", "")
    if not isinstance(name, str):
        raise BadParam(f"{where}.function.name must be a string", f"{where}.function.name")
    if not isinstance(description, str):
        raise BadParam(f"{where}.function.description must be a string", f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadParam(f"{where}.function.parameters must be a JSON Schema object", f"{where}.function.parameters")
    return common_pb2.Tool(name=name, description=description,
                           parameters=json.dumps(parameters) if parameters is not None else "")


def _tool_choice(choice: Any) -> common_pb2.ToolChoice:
    if choice in ("none", "auto", "required"):
        return common_pb2.ToolChoice(**{choice: True})
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return common_pb2.ToolChoice(function=choice["function"]["name"])
    raise BadParam('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                     '{"name": ...}}', "tool_choice")


def chat_message(i: int, role: str, content: str, tool_calls: list | None, tool_call_id: str | None,
                 name: str | None) -> common_pb2.ChatMessage:
    message = common_pb2.ChatMessage(role=role, content=content, tool_call_id=tool_call_id or "",
                                     name=name if role == "tool" and name else "")
    for j, call in enumerate(tool_calls or ()):
        where = f"messages.{i}.tool_calls.{j}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str):
            raise BadParam(f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}, '
                             "arguments a JSON string", where)
        message.tool_calls.append(common_pb2.ToolCall(id=str(call.get("id") or ""), name=function["name"],
                                                      arguments=function["arguments"]))
    return message


def message_tool_calls(calls) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_deltas(calls, first_index: int) -> list[dict]:
    """Stream deltas for calls, numbered on from first_index (the calls this choice already sent)."""
    return [{"index": first_index + k, **call} for k, call in enumerate(message_tool_calls(calls))]
