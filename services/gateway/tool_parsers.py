"""The parsers that take tool calls out of an answer's text as it streams, one per call format
(services/tokenizer/tool_prompt.py). Each hands back the text outside calls and each call once it is
whole; a call that does not parse, or names no tool of the request, stays text (the grammar in tools.py
rules both out)."""

from __future__ import annotations

import json

from llmmesh.v1 import common_pb2
from services.gateway.tools import CALL_LEADS, ToolFormat, new_call_id
from services.tokenizer.tool_prompt import CALL_CLOSE, CALL_OPEN, PYTHON_TAG

_DECODER = json.JSONDecoder()


def make_parser(names: set[str], tool_format: ToolFormat):
    """The parser for the format the request's prompt asked the model to call in."""
    return HermesParser(names) if tool_format.name == "hermes" else LeadingCallsParser(names, tool_format.name)


class _Calls:
    def __init__(self, names: set[str]):
        self.names = names
        self.calls_made = 0

    def _call(self, value, key: str) -> common_pb2.ToolCall | None:
        """A parsed call as the client gets it; None when it names no tool or its arguments are no object."""
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get(key, value.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        self.calls_made += 1
        return common_pb2.ToolCall(id=new_call_id(), name=value["name"],
                                   arguments=json.dumps(arguments, ensure_ascii=False))


class HermesParser(_Calls):
    """Feeds on an answer's text as it streams; hands back the text outside calls and each call once it
    is whole. Whitespace around calls is dropped, except one separator between text before and text
    after a call. A call that does not parse (which the grammar rules out) stays text."""

    def __init__(self, names: set[str]):
        super().__init__(names)
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
        return self._call(value, "arguments")




class LeadingCallsParser(_Calls):
    """llama3_json and mistral: calls lead the answer. Until its first characters show whether the
    answer begins like a call, nothing is handed back; text is then passed through as it comes, and
    each call is handed back as soon as its JSON closes. What follows mistral's list is text; a call
    that does not parse, and what follows it, stay text as the model wrote them."""

    def __init__(self, names: set[str], tool_format: str):
        super().__init__(names)
        self.tool_format = tool_format
        self._mistral = tool_format == "mistral"
        self._key = "arguments" if self._mistral else "parameters"
        self._separator = "," if self._mistral else ";"
        self._state = "start"  # start | calls | text | broken
        self._buffer = ""  # in calls: the text since the last call handed back
        self._after_calls = False  # whitespace between the calls and the text after them is dropped

    def feed(self, text: str) -> tuple[str, list[common_pb2.ToolCall]]:
        self._buffer += text
        if self._state == "start":
            begun = self._buffer.lstrip()
            leads = CALL_LEADS[self.tool_format]
            if any(begun.startswith(m) for m in leads):
                self._state, self._buffer = "calls", begun
            elif not begun or any(m.startswith(begun) for m in leads):
                return "", []  # it may still begin like a call
            else:
                self._state = "text"
        calls = self._take_calls() if self._state == "calls" else []
        if self._state != "text":
            return "", calls
        out, self._buffer = self._buffer, ""
        if self._after_calls:
            out = out.lstrip()
            self._after_calls = not out
        return out, calls

    def flush(self) -> str:
        """The text still held at the answer's end: an unfinished or broken call stays text."""
        rest, self._buffer = self._buffer, ""
        if self._state in ("start", "text"):
            return rest.lstrip() if self._after_calls else rest
        return rest.strip() if self.calls_made else rest

    def _take_calls(self) -> list[common_pb2.ToolCall]:
        calls = []
        while True:
            rest = self._buffer
            i = self._next_call(rest)
            if i is None or i == len(rest):
                break
            try:
                value, end = _DECODER.raw_decode(rest, i)
            except json.JSONDecodeError:
                break  # unfinished (or broken: the answer's end tells)
            call = self._call(value, self._key)
            if call is None:
                self._state = "broken"
                break
            calls.append(call)
            self._buffer = rest[end:]
        return calls

    def _next_call(self, rest: str) -> int | None:
        """Where the next call's JSON starts in `rest`; None where none follows (the state says why)."""
        i = _skip_space(rest, 0)
        if not self.calls_made:  # the marker, and mistral's list, open the first call
            lead = next((m for m in CALL_LEADS[self.tool_format] if m != "{" and rest.startswith(m, i)), "")
            i = _skip_space(rest, i + len(lead))
            if self._mistral:
                if i == len(rest):
                    return None
                if rest[i] != "[":
                    self._state = "broken"
                    return None
                i = _skip_space(rest, i + 1)
            return i
        if i == len(rest):
            return None
        if self._mistral and rest[i] == "]":  # the list's end: what follows is text
            self._state, self._buffer, self._after_calls = "text", rest[i + 1:], True
            return None
        if rest[i] != self._separator:
            self._state = "broken"
            return None
        i = _skip_space(rest, i + 1)
        if not self._mistral and rest.startswith(PYTHON_TAG, i):
            i = _skip_space(rest, i + len(PYTHON_TAG))
        return i


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (held back: the marker may follow)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
