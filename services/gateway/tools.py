"""Tool calls at the gateway: the grammar that holds a request's calls to its functions' schemas, and
the parser that takes the calls out of the answer's text as it streams.

The model writes calls in the format of services/tokenizer/tool_prompt.py:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tool_choice decides the grammar (llguidance's Lark, sent to the shard as the request's structured output):
- required: one or more calls and nothing else (exactly one without parallel_tool_calls);
- a named function: exactly one call, to it;
- auto: any text; once the text says `<tool_call>` the call must name a tool and its arguments must match
  that tool's parameters (a lazy lexeme ends the text there), and after it text or more calls follow
  (without parallel_tool_calls, the answer ends with its one call);
- none: no grammar, no parsing, and the tools are not shown to the model.
Every call that reaches a caller therefore parses and matches its function's schema.
"""

from __future__ import annotations

import json
import uuid

from llmmesh.v1 import common_pb2, gateway_pb2
from services.tokenizer.tool_prompt import CALL_CLOSE, CALL_OPEN

# The arguments as the prompt shows them: one line, ", " and ": " between items.
ARGUMENTS_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_mode(request: gateway_pb2.GenerateRequest) -> str:
    """none | auto | required | function: what the request's tools ask of the answer."""
    if not request.tools:
        return "none"
    kind = request.tool_choice.WhichOneof("kind") if request.HasField("tool_choice") else None
    return kind or "auto"


def parallel_calls(request: gateway_pb2.GenerateRequest) -> bool:
    return not request.HasField("parallel_tool_calls") or request.parallel_tool_calls


def tool_grammar(request: gateway_pb2.GenerateRequest) -> str | None:
    """The Lark grammar for the request's tool_choice, or None (none: free text)."""
    mode = tool_mode(request)
    if mode == "none":
        return None
    tools = [t for t in request.tools if mode != "function" or t.name == request.tool_choice.function]
    rules = [_function_rule(i, t) for i, t in enumerate(tools)]
    body = f'body: "\\n" ({" | ".join(f"fn{i}" for i in range(len(tools)))}) {json.dumps(chr(10) + CALL_CLOSE)}'
    if mode == "auto":
        start = "start: (hd body)* TEXT" if parallel_calls(request) else "start: TEXT | hd body"
        head = ["TEXT: /(.|\\n)*/", f"hd[lazy]: TEXT {json.dumps(CALL_OPEN)}"]
    else:
        several = mode == "required" and parallel_calls(request)
        start = 'start: call ("\\n" call)*' if several else "start: call"
        head = [f"call: {json.dumps(CALL_OPEN)} body"]
    return "\n".join([start, *head, body, *rules]) + "\n"


def _function_rule(i: int, tool: common_pb2.Tool) -> str:
    schema = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
    schema = {**schema, "x-guidance": ARGUMENTS_LAYOUT}
    opening = json.dumps(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
    return f'fn{i}: {opening} args{i} "}}"\nargs{i}: %json {json.dumps(schema)}'


class ToolCallParser:
    """Feeds on an answer's text as it streams; hands back the text outside calls and each call once it
    is whole. Whitespace around calls is dropped, except one separator between text before and text
    after a call. A call that does not parse (which the grammar rules out) stays text."""

    def __init__(self, names: set[str]):
        self.names = names
        self.calls_made = 0
        self._buffer = ""
        self._in_call = False
        self._space = ""  # whitespace held back until text follows it
        self._after_call = False
        self._emitted = False  # any text handed back yet

    def feed(self, text: str) -> tuple[str, list[common_pb2.ToolCall]]:
        self._buffer += text
        out, calls = [], []
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE):]
                self._in_call = False
                call = self._parse(body)
                if call is None:
                    out.append(self._text(CALL_OPEN + body + CALL_CLOSE))
                else:
                    calls.append(call)
                    self._after_call = True
                    if not self._emitted:
                        self._space = ""
                continue
            start = self._buffer.find(CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self._buffer, CALL_OPEN)
                out.append(self._text(self._buffer[:len(self._buffer) - keep]))
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            out.append(self._text(self._buffer[:start]))
            self._buffer, self._in_call = self._buffer[start + len(CALL_OPEN):], True
        return "".join(out), calls

    def flush(self) -> str:
        """The text still held at the answer's end (an unfinished call stays text)."""
        rest = (CALL_OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        text = self._text(rest)
        return text + ("" if self.calls_made else self._space)

    def _text(self, text: str) -> str:
        """Text outside calls: whitespace at its end is held until what follows is known."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        stripped = text.rstrip()
        if not stripped:
            self._space += text
            return ""
        out = self._space + stripped
        self._space = text[len(stripped):]
        self._emitted = True
        return out

    def _parse(self, body: str) -> common_pb2.ToolCall | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if (not isinstance(value, dict) or value.get("name") not in self.names
                or not isinstance(value.get("arguments", {}), dict)):
            return None
        self.calls_made += 1
        return common_pb2.ToolCall(id=new_call_id(), name=value["name"],
                                   arguments=json.dumps(value.get("arguments", {}), ensure_ascii=False))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (held back: the marker may follow)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
