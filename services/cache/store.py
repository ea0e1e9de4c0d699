"""A byte-budgeted LRU map of opaque values. Single-threaded (the asyncio loop owns it)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoreStats:
    entries: int = 0
    bytes: int = 0
    lookups: int = 0
    hits: int = 0
    evictions: int = 0


class LRUByteStore:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._stats = StoreStats()

    @staticmethod
    def _cost(key: bytes, value: bytes) -> int:
        return len(key) + len(value)

    def get(self, key: bytes) -> bytes | None:
        self._stats.lookups += 1
        value = self._items.get(key)
        if value is not None:
            self._stats.hits += 1
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> bool:
        """Store (or refresh) key; evict least recently used entries to stay in budget.
        Returns False, storing nothing, when the entry alone exceeds the budget."""
        cost = self._cost(key, value)
        if cost > self.budget_bytes:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self._stats.bytes -= self._cost(key, old)
        while self._items and self._stats.bytes + cost > self.budget_bytes:
            old_key, old_value = self._items.popitem(last=False)
            self._stats.bytes -= self._cost(old_key, old_value)
            self._stats.evictions += 1
        self._items[key] = value
        self._stats.bytes += cost
        return True

    def stats(self) -> StoreStats:
        return StoreStats(len(self._items), self._stats.bytes, self._stats.lookups, self._stats.hits, self._stats.evictions)
