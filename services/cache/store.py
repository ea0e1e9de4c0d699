"""A byte-budgeted LRU map of opaque values. Single-threaded (the asyncio loop owns it).

Entries put with retain (a stored conversation's KV blocks) sit in a second LRU list, evicted only
once the first is empty, and bounded to retained_budget bytes: past it, the least recently used
retained entries move to the ordinary list, so idle conversations cannot fill the whole budget."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class StoreStats:
    entries: int = 0
    bytes: int = 0
    lookups: int = 0
    hits: int = 0
    evictions: int = 0


class LRUByteStore:
    def __init__(self, budget_bytes: int, retained_budget: int | None = None):
        """retained_budget: bytes the retained list may hold (default: half the budget)."""
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.retained_budget = budget_bytes // 2 if retained_budget is None else retained_budget
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._retained: OrderedDict[bytes, bytes] = OrderedDict()
        self._retained_bytes = 0
        self._stats = StoreStats()
        # Told of each key newly held (True) and each key evicted (False), e.g. to feed an index.
        self.listener: Callable[[bytes, bool], None] | None = None

    def keys(self) -> Iterator[bytes]:
        yield from self._retained
        yield from self._items

    @staticmethod
    def _cost(key: bytes, value: bytes) -> int:
        return len(key) + len(value)

    def get(self, key: bytes) -> bytes | None:
        self._stats.lookups += 1
        tier = self._retained if key in self._retained else self._items
        value = tier.get(key)
        if value is not None:
            self._stats.hits += 1
            tier.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes, retain: bool = False) -> bool:
        """Store (or refresh) key; evict least recently used entries to stay in budget, ordinary
        ones before retained ones. Returns False, storing nothing, when the entry alone exceeds the
        budget."""
        cost = self._cost(key, value)
        if cost > self.budget_bytes:
            return False
        retain = retain or key in self._retained  # a retained entry stays so when refreshed
        known = self._remove(key)
        while self._stats.bytes + cost > self.budget_bytes and (self._items or self._retained):
            tier = self._items or self._retained
            old_key, old_value = tier.popitem(last=False)
            self._stats.bytes -= self._cost(old_key, old_value)
            if tier is self._retained:
                self._retained_bytes -= self._cost(old_key, old_value)
            self._stats.evictions += 1
            if self.listener is not None:
                self.listener(old_key, False)
        (self._retained if retain else self._items)[key] = value
        if not known and self.listener is not None:
            self.listener(key, True)
        self._stats.bytes += cost
        if retain:
            self._retained_bytes += cost
            while self._retained_bytes > self.retained_budget and self._retained:
                old_key, old_value = self._retained.popitem(last=False)
                self._retained_bytes -= self._cost(old_key, old_value)
                self._items[old_key] = old_value  # an ordinary entry now, most recently used
        return True

    def _remove(self, key: bytes) -> bool:
        """Takes key out (to be put again); whether it was held."""
        for tier in (self._items, self._retained):
            old = tier.pop(key, None)
            if old is not None:
                self._stats.bytes -= self._cost(key, old)
                if tier is self._retained:
                    self._retained_bytes -= self._cost(key, old)
                return True
        return False

    @property
    def retained_bytes(self) -> int:
        return self._retained_bytes

    def stats(self) -> StoreStats:
        s = self._stats
        return StoreStats(len(self._items) + len(self._retained), s.bytes, s.lookups, s.hits, s.evictions)
