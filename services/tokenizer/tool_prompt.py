"""How tools and tool messages reach a model, and the one call format the mesh reads back.

Calls are written as Hermes-style blocks (the format of Qwen2.5's, Hermes' and many other templates):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders tools itself (it uses the `tools` variable, as Hugging Face templates do) gets
them in Hugging Face's shapes: `tools` as [{"type": "function", "function": {...}}], an assistant's calls as
`tool_calls`, a result as a message of role `tool` with `tool_call_id`. Such a template must ask for the
format above. A template that does not (SmolLM2's) gets the conversation folded into the roles it knows:
- the tool definitions, and how to call them, are appended to the system message (which, when the
  conversation has none, replaces the template's default one);
- an assistant's calls are written into its content as the blocks above;
- consecutive tool results become one user message of <tool_response> blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolDef:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object"})

    def as_hf(self) -> dict:
        described = {"description": self.description} if self.description else {}
        return {"type": "function", "function": {"name": self.name, **described, "parameters": self.parameters}}


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # a JSON object, as text


def call_block(name: str, arguments: str) -> str:
    """A call as the model writes it."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CALL_CLOSE}'


def tools_instructions(tools: list[ToolDef]) -> str:
    listed = "\n".join(json.dumps(t.as_hf(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n"
            f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}')


def hf_messages(messages: list) -> list[dict]:
    """Messages as Hugging Face templates that render tools take them."""
    out = []
    for m in messages:
        item: dict = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                  for c in m.tool_calls]
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
            if m.name:
                item["name"] = m.name
        out.append(item)
    return out


def folded_messages(messages: list, tools: list[ToolDef]) -> list[dict]:
    """The conversation in system/user/assistant roles only, tools described in the system message."""
    out: list[dict] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        content = m.content
        if m.tool_calls:
            blocks = "\n".join(call_block(c.name, c.arguments) for c in m.tool_calls)
            content = f"{content}\n{blocks}" if content else blocks
        out.append({"role": m.role, "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{tools_instructions(tools)}"
        else:
            out.insert(0, {"role": "system", "content": tools_instructions(tools)})
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in out]
