"""Incremental detokenization that never emits a broken UTF-8 character.

Byte-level BPE splits one character across tokens (a Chinese character or an emoji is often 2-4
tokens). Each push decodes a short window of recent tokens; text is released only when it does not
end in U+FFFD (an unfinished byte sequence), so every delta is whole characters and the deltas
concatenate to the full decode.
"""

from __future__ import annotations

from services.tokenizer.text import TextTokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (a character boundary)
        self._read_offset = 0  # tokens up to here have been released as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self._ids.extend(token_ids)
        released = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        if len(current) > len(released) and not current.endswith(REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return current[len(released) :]
        return ""

    def flush(self) -> str:
        """The text still held at the end of the stream. Bytes of a character the model never
        finished are dropped rather than sent as U+FFFD."""
        released = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return current[len(released) :].rstrip(REPLACEMENT)
