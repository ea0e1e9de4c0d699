"""The chained hash that names a full block of tokens, shared by shards, the cache and the gateway.

hash(block i) = blake2b(hash(block i-1) || token ids of block i). Equal hashes mean equal prefixes,
whatever process computed them (unlike Python's hash(), which is salted per process).

The chain starts from its scope's root (scope_root): a prompt's blocks are shared only by requests of one
scope, by default a tenant's (the gateway's cache_scope), so a cache hit never reveals what another
scope computed. The empty scope's root is ROOT, shared by all.
"""

from __future__ import annotations

import array
import hashlib

ROOT = b"llmmesh-block-v1"


def hash_block(parent: bytes, tokens) -> bytes:
    return hashlib.blake2b(parent + array.array("I", tokens).tobytes(), digest_size=16).digest()


def scope_root(scope: bytes = b"") -> bytes:
    """Where the hash chain of a prompt in `scope` starts; the empty scope's is ROOT."""
    if not scope:
        return ROOT
    return hashlib.blake2b(ROOT + b"\0scope\0" + scope, digest_size=16).digest()


def cache_scope(tenant: str, cache_salt: str = "", shared: bool = False) -> bytes:
    """The prefix-cache scope of a request: its tenant's (unless the operator shares the cache across
    tenants), narrowed by the request's cache_salt. Length-prefixed, so no two pairs collide."""
    owner = b"" if shared else tenant.encode()
    salt = cache_salt.encode()
    if not owner and not salt:
        return b""
    return b"%d:%s%d:%s" % (len(owner), owner, len(salt), salt)


def chain_block_hashes(token_ids, block_size: int, parents: list[bytes] | None = None,
                       root: bytes = ROOT) -> list[bytes]:
    """Hashes of every full block of token_ids, chained from `root` (scope_root). `parents` (hashes
    already known for the leading blocks) is extended in place and returned, so growing sequences
    hash each block once."""
    hashes = parents if parents is not None else []
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else root
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


def index_key(block_hash: bytes) -> int:
    """A block's compact name in the shards' prefix index: the first 8 bytes of its hash."""
    return int.from_bytes(block_hash[:8], "big")
