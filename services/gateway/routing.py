"""Prefix-affinity routing: send a prompt to the replica that most likely still holds its prefix.

The gateway remembers, per prompt block (by the chained block hash the shards use), which replica
last computed it, in a bounded LRU. A replica's score is the number of leading blocks it holds
minus its outstanding requests times `load_weight_blocks`, so one hot prefix does not pin every
request on a busy replica.
"""

from __future__ import annotations

from collections import OrderedDict

from services.common.block_hash import chain_block_hashes
from services.gateway.shards import Replica


class PrefixAffinity:
    def __init__(self, capacity_blocks: int = 200_000, load_weight_blocks: float = 8.0):
        self.capacity = capacity_blocks
        self.load_weight_blocks = load_weight_blocks
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # block hash -> replica address

    @staticmethod
    def hashes(token_ids: list[int], block_size: int) -> list[bytes]:
        return chain_block_hashes(token_ids, block_size)

    def held_blocks(self, address: str, hashes: list[bytes]) -> int:
        """Leading blocks of the prompt last computed on `address`."""
        n = 0
        for h in hashes:
            if self._owner.get(h) != address:
                break
            n += 1
        return n

    def order(self, replicas: list[Replica], hashes: list[bytes]) -> list[Replica]:
        """Best first: healthy before suspect, then prefix held against load."""
        return sorted(replicas, key=lambda r: (r.suspect, -(self.held_blocks(r.address, hashes)
                                                            - r.outstanding * self.load_weight_blocks)))

    def record(self, address: str, hashes: list[bytes]) -> None:
        for h in hashes:
            self._owner[h] = address
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
