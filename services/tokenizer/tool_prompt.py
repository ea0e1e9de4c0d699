"""How tools and tool messages reach a model, and the call formats the mesh reads back.

Three formats, the ones the families' own templates ask for (the gateway's parsers read them back):
- hermes (Qwen2/2.5/3, Hermes, and the mesh's own fold below): blocks anywhere in the answer,
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>
- llama3_json (Llama 3.1-3.3): the answer is the call, `{"name": ..., "parameters": {...}}`, after an
  optional <|python_tag|>; several are separated by "; ";
- mistral (Mistral v0.3 / Mixtral templates): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`
  leading the answer.
The format is the template's (the marker it writes), else the family's, else hermes; --tool-call-format
overrides it.

A chat template that renders tools itself (it uses the `tools` variable, as Hugging Face templates do) gets
them in Hugging Face's shapes: `tools` as [{"type": "function", "function": {...}}], an assistant's calls as
`tool_calls`, a result as a message of role `tool` with `tool_call_id`. A template that does not (SmolLM2's)
gets the conversation folded into the roles it knows:
- the tool definitions, and how to call them in the format, are appended to the system message (which,
  when the conversation has none, replaces the template's default one);
- an assistant's calls are written into its content in the format;
- consecutive tool results become one user message of <tool_response> blocks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS = "[TOOL_CALLS]"
TOOL_FORMATS = ("hermes", "llama3_json", "mistral")
# The format a family's published templates ask for, where the template itself names no marker.
FAMILY_FORMATS = {"llama": "llama3_json", "mistral": "mistral", "mixtral": "mistral"}


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


def detect_format(template: str | None, renders_tools: bool, model_type: str) -> str:
    """The call format a checkpoint's template asks for (hermes for the mesh's own fold)."""
    if not template or not renders_tools or CALL_OPEN in template:
        return "hermes"
    if MISTRAL_CALLS in template:
        return "mistral"
    if PYTHON_TAG in template or '"parameters"' in template:
        return "llama3_json"
    return FAMILY_FORMATS.get(model_type, "hermes")


def call_block(name: str, arguments: str) -> str:
    """A call as the model writes it (hermes)."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CALL_CLOSE}'


def calls_text(calls, tool_format: str) -> str:
    """An assistant's calls written as the format asks the model to write them."""
    if tool_format == "llama3_json":
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls)
    if tool_format == "mistral":
        listed = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls)
        return f"{MISTRAL_CALLS} [{listed}]"
    return "\n".join(call_block(c.name, c.arguments) for c in calls)


_HOW_TO_CALL = {
    "hermes": ("For each function call, return a json object with function name and arguments within "
               f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n"
               f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'),
    "llama3_json": ('To call a function, respond only with JSON in the format {"name": function name, '
                    '"parameters": dictionary of argument name and its value}; separate several calls with "; ".'),
    "mistral": (f'To call functions, respond only with {MISTRAL_CALLS} followed by a JSON list of calls: '
                f'{MISTRAL_CALLS} [{{"name": <function-name>, "arguments": <args-json-object>}}]'),
}


def tools_instructions(tools: list[ToolDef], tool_format: str = "hermes") -> str:
    listed = "\n".join(json.dumps(t.as_hf(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n" + _HOW_TO_CALL[tool_format])


def mistral_call_id(call_id: str) -> str:
    """Mistral's templates take only 9 letters and digits as a call id: a stable one derived from ours."""
    digits = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    for _ in range(9):
        digits, k = divmod(digits, len(alphabet))
        out += alphabet[k]
    return out


def hf_messages(messages: list, tool_format: str = "hermes") -> list[dict]:
    """Messages as Hugging Face templates that render tools take them."""
    call_id = mistral_call_id if tool_format == "mistral" else str
    out = []
    for m in messages:
        item: dict = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": call_id(c.id), "type": "function",
                                   "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                  for c in m.tool_calls]
        if m.role == "tool":
            item["tool_call_id"] = call_id(m.tool_call_id)
            if m.name:
                item["name"] = m.name
        out.append(item)
    return out


def folded_messages(messages: list, tools: list[ToolDef], tool_format: str = "hermes") -> list[dict]:
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
            blocks = calls_text(m.tool_calls, tool_format)
            content = f"{content}\n{blocks}" if content else blocks
        out.append({"role": m.role, "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{tools_instructions(tools, tool_format)}"
        else:
            out.insert(0, {"role": "system", "content": tools_instructions(tools, tool_format)})
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in out]
