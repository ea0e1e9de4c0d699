"""One choice's text stage: the shard's token ids become the text the client sees. Tokens are
detokenized (a session: local, or the tokenizer service's stream), stop strings are matched with
hold-back, tool calls are taken out whole; the stage decides the finish reason the client sees.
No transport here beyond the session it is given."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmmesh.v1 import common_pb2
from services.gateway.stop_strings import StopStringMatcher
from services.gateway.tool_parsers import make_parser
from services.gateway.tools import HERMES, ToolFormat


@dataclass
class Piece:
    text: str
    finish_reason: str  # "" until the choice ends; "stop", "length", "tool_calls"
    tool_calls: list[common_pb2.ToolCall] = field(default_factory=list)
    stop_sequence: str = ""  # the stop string that ended the choice


class AnswerText:
    def __init__(self, session, stop: list[str], tool_names: frozenset[str] | None = None,
                 tool_format: ToolFormat = HERMES):
        """session: push(token_ids) -> text, flush() -> text (detokenize.py); tool_names: the calls to
        take out of the text (None: no tools), written in tool_format."""
        self.session = session
        self.matcher = StopStringMatcher(stop)
        self.calls = make_parser(set(tool_names), tool_format) if tool_names is not None else None

    async def feed(self, token_ids, shard_finish_reason: str = "") -> Piece:
        """The text a shard message's tokens complete; shard_finish_reason: the message's own."""
        text = await self.session.push(token_ids) if token_ids else ""
        text, stopped = self.matcher.feed(text)
        if shard_finish_reason and not stopped:  # the end: whatever the detokenizer and matcher held back
            tail, stopped = self.matcher.feed(await self.session.flush())
            text += tail if stopped else tail + self.matcher.flush()
        finish_reason = "stop" if stopped else shard_finish_reason
        made = []
        if self.calls is not None:
            text, made = self.calls.feed(text)
            if finish_reason:
                text += self.calls.flush()
                if self.calls.calls_made and finish_reason == "stop":
                    finish_reason = "tool_calls"
        return Piece(text, finish_reason, made, self.matcher.matched if stopped else "")
