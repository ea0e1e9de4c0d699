"""Tool calls at the gateway: the grammar that holds a request's calls to its functions' schemas, in the
call format the tokenizer's rendering asked for (services/tokenizer/tool_prompt.py). The parsers that take
the calls out of the streamed text are in tool_parsers.py.

hermes: `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>` blocks.
tool_choice decides the grammar (llguidance's Lark, sent to the shard as the request's structured output):
- required: one or more calls and nothing else (exactly one without parallel_tool_calls);
- a named function: exactly one call, to it;
- auto: any text; once the text says `<tool_call>` the call must name a tool and its arguments must match
  that tool's parameters (a lazy lexeme ends the text there), and after it text or more calls follow
  (without parallel_tool_calls, the answer ends with its one call);
- none: no grammar, no parsing, and the tools are not shown to the model.
llama3_json and mistral: the calls are the whole answer (`{"name": ..., "parameters": ...}` joined by "; ",
or `[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]`), as these families' templates ask; auto allows
either calls or text that does not begin like a call, so the parser knows from the answer's first
characters which it reads.
Every call that reaches a caller therefore parses and matches its function's schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from llmmesh.v1 import common_pb2, gateway_pb2
from services.tokenizer.tool_prompt import CALL_CLOSE, CALL_OPEN, MISTRAL_CALLS, PYTHON_TAG, TOOL_FORMATS

# The arguments as the prompt shows them: one line, ", " and ": " between items.
ARGUMENTS_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolFormat:
    name: str = "hermes"
    marker_token: int | None = None  # the token that opens the calls, where the marker is one token

    @classmethod
    def of_encoding(cls, reply) -> ToolFormat:
        """The format an EncodeResponse names (an older tokenizer names none: hermes)."""
        name = reply.tool_call_format or "hermes"
        if name not in TOOL_FORMATS:
            raise ValueError(f"the tokenizer asked for tool call format {name!r}, which this gateway does not parse")
        return cls(name, reply.tool_call_marker_token if reply.HasField("tool_call_marker_token") else None)


HERMES = ToolFormat()
# What an answer of calls begins with, in the formats whose calls lead the answer.
CALL_LEADS = {"llama3_json": ("{", PYTHON_TAG), "mistral": (MISTRAL_CALLS,)}


def tool_mode(request: gateway_pb2.GenerateRequest) -> str:
    """none | auto | required | function: what the request's tools ask of the answer."""
    if not request.tools:
        return "none"
    kind = request.tool_choice.WhichOneof("kind") if request.HasField("tool_choice") else None
    return kind or "auto"


def parallel_calls(request: gateway_pb2.GenerateRequest) -> bool:
    return not request.HasField("parallel_tool_calls") or request.parallel_tool_calls


def tool_grammar(request: gateway_pb2.GenerateRequest, tool_format: ToolFormat = HERMES) -> str | None:
    """The Lark grammar for the request's tool_choice in the format, or None (none: free text)."""
    mode = tool_mode(request)
    if mode == "none":
        return None
    tools = [t for t in request.tools if mode != "function" or t.name == request.tool_choice.function]
    if tool_format.name != "hermes":
        return _leading_calls_grammar(request, mode, tools, tool_format)
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


def _leading_calls_grammar(request, mode: str, tools, tool_format: ToolFormat) -> str:
    """llama3_json / mistral: the answer is its calls; auto also allows text that does not begin like them."""
    key = "parameters" if tool_format.name == "llama3_json" else "arguments"
    rules = [_function_rule(i, t, key) for i, t in enumerate(tools)]
    several = mode != "function" and parallel_calls(request)
    if tool_format.name == "llama3_json":
        calls = 'calls: fn ("; " fn)*' if several else "calls: fn"
    else:
        token = tool_format.marker_token
        marker = f"<[{token}]>" if token is not None else json.dumps(MISTRAL_CALLS)  # the token, not its text
        more = '(", " fn)* ' if several else ""
        calls = f'calls: {marker} " [" fn {more}"]"'
    start = (f"start: calls | PLAIN\nPLAIN: /{_not_beginning(CALL_LEADS[tool_format.name])}/" if mode == "auto"
             else "start: calls")
    fn = f'fn: {" | ".join(f"fn{i}" for i in range(len(tools)))}'
    return "\n".join([start, calls, fn, *rules]) + "\n"


def _not_beginning(leads: tuple[str, ...]) -> str:
    """A regex of every text whose first characters after whitespace begin none of `leads`."""
    def after(prefixes: list[str], first: bool) -> str:
        # prefixes: the rest of each lead still to rule out (none empty)
        firsts = sorted({p[0] for p in prefixes})
        excluded = "".join(_class_char(c) for c in firsts) + ("\\s" if first else "")
        branches = [f"[^{excluded}](.|\\n)*"]
        for c in firsts:
            rest = [p[1:] for p in prefixes if p[0] == c]
            if all(rest):  # no lead ends here: what follows may still rule them out
                branches.append(_regex_char(c) + after(rest, False))
        return f"({'|'.join(branches)})?"

    return "\\s*" + after(list(leads), True)


def _class_char(c: str) -> str:
    return "\\" + c if c in "\\]^-[/" else c


def _regex_char(c: str) -> str:
    return re.escape(c).replace("/", "\\/")


def _function_rule(i: int, tool: common_pb2.Tool, key: str = "arguments") -> str:
    schema = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
    schema = {**schema, "x-guidance": ARGUMENTS_LAYOUT}
    opening = json.dumps(f'{{"name": {json.dumps(tool.name)}, "{key}": ')
    return f'fn{i}: {opening} args{i} "}}"\nargs{i}: %json {json.dumps(schema)}'


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
