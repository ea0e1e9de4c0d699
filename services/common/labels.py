"""Metric label values a caller controls (tenant names), kept to a bounded set: Prometheus keeps a
series per value, so the first `limit` distinct values get their own and the rest share "other"."""

from __future__ import annotations

OTHER = "other"


class BoundedLabels:
    def __init__(self, limit: int = 64, known: tuple[str, ...] = ()):
        self.limit = limit
        self._seen: set[str] = set(known)

    def __call__(self, value: str) -> str:
        value = value or "none"
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER
