"""KV blocks on the wire: each block's value split into chunks, and joined again on the other side.

Shared by the cache service and the shards. A block is the data of consecutive chunks with one
block_hash, the final chunk marked `last`; the layout travels on each block's first chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Container, Iterable, Iterator
from typing import NamedTuple

from llmmesh.v1 import cache_pb2

CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB default message limit
MAX_BLOCK_BYTES = 256 << 20  # a sender streaming one endless block is cut off here


class MalformedStream(ValueError):
    pass


class Block(NamedTuple):
    layout: str
    block_hash: bytes
    value: bytes
    retain: bool  # a stored conversation's block: kept longest


def to_chunks(layout: str, blocks: Iterable[tuple[bytes, bytes]],
              retained: Container[bytes] = frozenset()) -> Iterator[cache_pb2.KvBlockChunk]:
    """blocks: (block_hash, value) pairs, in order; retained: the hashes of those to keep longest."""
    for block_hash, value in blocks:
        view = memoryview(value)
        for offset in range(0, max(len(view), 1), CHUNK_BYTES):
            piece = view[offset : offset + CHUNK_BYTES]
            yield cache_pb2.KvBlockChunk(layout=layout if offset == 0 else "", block_hash=block_hash,
                                         data=bytes(piece), last=offset + CHUNK_BYTES >= len(view),
                                         retain=offset == 0 and block_hash in retained)


async def from_chunks(chunks: AsyncIterable[cache_pb2.KvBlockChunk]) -> AsyncIterator[Block]:
    """Each complete block; MalformedStream on a broken sequence."""
    layout, block_hash, parts, size, retain = "", None, [], 0, False
    async for chunk in chunks:
        if block_hash is None:
            if not chunk.block_hash:
                raise MalformedStream("a chunk has no block_hash")
            block_hash, layout, retain = chunk.block_hash, chunk.layout or layout, chunk.retain
            if not layout:
                raise MalformedStream("the first chunk of a block has no layout")
        elif chunk.block_hash != block_hash:
            raise MalformedStream("a block ended without a chunk marked last")
        parts.append(chunk.data)
        size += len(chunk.data)
        if size > MAX_BLOCK_BYTES:
            raise MalformedStream(f"a block exceeds {MAX_BLOCK_BYTES} bytes")
        if chunk.last:
            yield Block(layout, block_hash, b"".join(parts), retain)
            block_hash, parts, size = None, [], 0
    if block_hash is not None:
        raise MalformedStream("the stream ended inside a block")
