"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, an eviction-ordered free
list, and prefix caching by chained block hash.

A full block keeps its hash after its sequences free it: it sits in the free list, reusable by a
later request with the same prefix, until allocation evicts it (least recently freed first).
Blocks freed by a sequence that asked to retain them (a stored conversation's turn) wait in a second
list, evicted only once the first is empty; at most max_retained of them, so idle conversations
cannot pin the whole cache (past the bound, the longest-retained go back to the ordinary list).
The scheduler sees block ids only; the executor owns the tensors they index.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    allocated_blocks: int = 0  # blocks handed out fresh (a shared block counts once)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, max_retained: int | None = None):
        """max_retained: blocks the retained list may hold (default: half the pool)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_retained = num_blocks // 2 if max_retained is None else max_retained
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: evicted first
        self._retained: OrderedDict[int, None] = OrderedDict()  # evicted once _free is empty
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self.stats = PrefixStats()
        # Changes to the set of cached hashes since the last take_changes(), for whoever mirrors
        # it (the gateway's routing index); off until someone asks.
        self.track_changes = False
        self._changes: dict[bytes, bool] = {}  # hash -> cached now (the last change wins)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._retained)

    @property
    def num_retained(self) -> int:
        return len(self._retained)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (nothing taken) when fewer than n are free."""
        if n > self.num_free:
            return None
        blocks = []
        for _ in range(n):
            block, _ = (self._free or self._retained).popitem(last=False)
            old = self._hash_of[block]
            if old is not None:  # evict its cached content
                del self._block_of[old]
                self._hash_of[block] = None
                self.stats.evicted_blocks += 1
                if self.track_changes:
                    self._changes[old] = False
            self._ref_counts[block] = 1
            blocks.append(block)
        self.stats.allocated_blocks += n
        return blocks

    def free(self, blocks: list[int], retain: bool = False) -> None:
        """retain: the blocks go to the retained list (evicted last), within max_retained."""
        # Last blocks first: a sequence's tail is the least likely to be shared, so it goes first.
        for block in reversed(blocks):
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                (self._retained if retain and self._hash_of[block] is not None else self._free)[block] = None
        while len(self._retained) > self.max_retained:
            block, _ = self._retained.popitem(last=False)
            self._free[block] = None

    def count_cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading hashes are cached, taking nothing. Safe to call from another thread
        as a hint (dict reads are atomic); the answer may be stale by the time it is used."""
        n = 0
        for h in hashes:
            if h not in self._block_of:
                break
            n += 1
        return n

    def take_cached_prefix(self, hashes: list[bytes], record_stats: bool = True) -> list[int]:
        """The blocks holding the longest cached run of `hashes`, each with a reference taken."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del (self._free if block in self._free else self._retained)[block]
            self._ref_counts[block] += 1
            blocks.append(block)
        if record_stats:
            self.stats.queried_tokens += len(hashes) * self.block_size
            self.stats.hit_tokens += len(blocks) * self.block_size
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """Name a full, computed block so later requests can reuse it. First writer wins."""
        if self._hash_of[block] is None and block_hash not in self._block_of:
            self._hash_of[block] = block_hash
            self._block_of[block_hash] = block
            if self.track_changes:
                self._changes[block_hash] = True

    def cached_hashes(self) -> list[bytes]:
        return list(self._block_of)

    def take_changes(self) -> tuple[list[bytes], list[bytes]]:
        """The net change since the last call: (hashes now cached, hashes no longer cached)."""
        changes, self._changes = self._changes, {}
        return [h for h, cached in changes.items() if cached], [h for h, cached in changes.items() if not cached]
