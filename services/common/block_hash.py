"""The chained hash that names a full block of tokens, shared by shards, the cache and the gateway.

hash(block i) = blake2b(hash(block i-1) || token ids of block i). Equal hashes mean equal prefixes,
whatever process computed them (unlike Python's hash(), which is salted per process).
"""

from __future__ import annotations

import array
import hashlib

ROOT = b"llmmesh-block-v1"


def hash_block(parent: bytes, tokens) -> bytes:
    return hashlib.blake2b(parent + array.array("I", tokens).tobytes(), digest_size=16).digest()


def chain_block_hashes(token_ids, block_size: int, parents: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full block of token_ids. `parents` (hashes already known for the leading
    blocks) is extended in place and returned, so growing sequences hash each block once."""
    hashes = parents if parents is not None else []
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else ROOT
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


def index_key(block_hash: bytes) -> int:
    """A block's compact name in the shards' prefix index: the first 8 bytes of its hash."""
    return int.from_bytes(block_hash[:8], "big")
