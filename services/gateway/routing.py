"""Prefix-affinity routing: send a prompt to the replica that holds the longest run of its prefix.

Each shard streams the block hashes its prefix cache holds (WatchPrefixIndex; ShardPool mirrors
it per replica), so the index follows what shards really keep, evictions included. Where a shard
does not stream one, the gateway falls back to its own memory: which replica it last sent each
prompt block to (a bounded LRU). A replica's score is the number of leading blocks it holds minus
its outstanding requests times `load_weight_blocks`, so one hot prefix does not pin every request
on a busy replica.
"""

from __future__ import annotations

from collections import OrderedDict

from services.common.block_hash import chain_block_hashes, index_key, scope_root
from services.gateway.shards import Replica


class PrefixAffinity:
    def __init__(self, capacity_blocks: int = 200_000, load_weight_blocks: float = 8.0):
        self.capacity = capacity_blocks
        self.load_weight_blocks = load_weight_blocks
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # block hash -> replica address

    @staticmethod
    def hashes(token_ids: list[int], block_size: int, scope: bytes = b"") -> list[bytes]:
        """The prompt's block hashes in its prefix-cache scope, as its shard names them."""
        return chain_block_hashes(token_ids, block_size, root=scope_root(scope))

    def held_blocks(self, replica: Replica, hashes: list[bytes]) -> int:
        """Leading blocks of the prompt that `replica` holds (by its own index when it streams one)."""
        index = replica.prefix_index
        n = 0
        for h in hashes:
            held = index is not None and index_key(h) in index
            if not held and (index is not None or self._owner.get(h) != replica.address):
                break
            n += 1
        return n

    def order(self, replicas: list[Replica], hashes: list[bytes], tenant: str = "") -> list[Replica]:
        """Best first: healthy before suspect, then prefix held against load (the tenant's own calls
        counted twice, so one tenant's load spreads over the replicas)."""
        return sorted(replicas, key=lambda r: (r.suspect, -(self.held_blocks(r, hashes) - (
            r.outstanding + r.by_tenant[tenant]) * self.load_weight_blocks)))

    def record(self, address: str, hashes: list[bytes]) -> None:
        for h in hashes:
            self._owner[h] = address
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
