"""Stop strings matched on streamed text: text that might begin a stop string is held back until
it is known not to, so the client never sees part of a stop string."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._text = ""
        self._emitted = 0  # characters of _text already released
        self.matched = ""  # the stop string that was hit

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text to release, whether a stop string was hit). After a hit the released text
        ends right before the stop string and nothing more should be fed."""
        self._text += delta
        hit = -1
        for stop in self.stops:
            # A match cannot start before _emitted: held-back text always covers a partial stop.
            idx = self._text.find(stop, self._emitted)
            if idx != -1 and (hit == -1 or idx < hit):
                hit, self.matched = idx, stop
        if hit != -1:
            out, self._emitted = self._text[self._emitted : hit], hit
            return out, True
        safe = max(len(self._text) - self._hold, self._emitted)
        out, self._emitted = self._text[self._emitted : safe], safe
        return out, False

    def flush(self) -> str:
        """The held-back text, at the end of a stream that hit no stop string."""
        out, self._emitted = self._text[self._emitted :], len(self._text)
        return out
