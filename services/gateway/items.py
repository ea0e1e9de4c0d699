"""Conversation items in OpenAI's Responses shape, and the chat messages they render as.

A stored item is a message: {"type": "message", "id", "role", "status", "content": [parts]}, each
part {"type": "input_text" | "output_text", "text"}. Other item types (images, files, tool calls and
their outputs, reasoning) are refused by name rather than dropped.
"""

from __future__ import annotations

from llmmesh.v1 import common_pb2
from services.gateway.openai_requests import BadParam
from services.gateway.store.store import new_id

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")


def input_items(value, param: str = "input") -> list[dict]:
    """A Responses `input` (text, or a list of items) as stored message items, each with a new id."""
    if isinstance(value, str):
        return [message_item("user", value)]
    if not isinstance(value, list):
        raise BadParam(f"{param} must be text or a list of items", param)
    return [_item(i, item, f"{param}[{i}]") for i, item in enumerate(value)]


def _item(index: int, item, param: str) -> dict:
    if not isinstance(item, dict):
        raise BadParam(f"{param} must be an object", param)
    kind = item.get("type", "message")
    if kind != "message":
        raise BadParam(f"{param}: items of type {kind!r} are not supported; send messages", param)
    role = item.get("role")
    if role not in ROLES:
        raise BadParam(f"{param}.role is {role!r}; expected one of {', '.join(ROLES)}", f"{param}.role")
    return message_item(role, _text(item.get("content"), f"{param}.content"))


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadParam(f"{param} must be text or a list of text parts", param)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise BadParam(f"{param}[{i}]: parts of type {kind!r} are not supported; send input_text", f"{param}[{i}]")
        texts.append(part["text"])
    return "".join(texts)


def message_item(role: str, text: str, item_id: str | None = None) -> dict:
    part = "output_text" if role == "assistant" else "input_text"
    content = {"type": part, "text": text, **({"annotations": []} if part == "output_text" else {})}
    return {"type": "message", "id": item_id or new_id("msg"), "status": "completed", "role": role,
            "content": [content]}


def item_text(item: dict) -> str:
    return "".join(p.get("text", "") for p in item.get("content", ()))


def item_messages(items: list[dict]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=ROLES.get(item["role"], item["role"]), content=item_text(item))
            for item in items]


def message_items(messages) -> list[dict]:
    """gRPC chat messages as items (roles as the chat template knows them)."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise BadParam(f"messages[{i}].role is {m.role!r}; a stored conversation holds "
                           f"{', '.join(ROLES)} messages", f"messages[{i}].role")
        if m.tool_calls or m.tool_call_id:
            raise BadParam(f"messages[{i}]: tool calls are not stored in conversations yet", f"messages[{i}]")
        out.append(message_item(m.role, m.content))
    return out
