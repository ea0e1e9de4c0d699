"""gRPC front of the cache service."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import Counter, Gauge

from llmmesh.v1 import cache_pb2, cache_pb2_grpc
from services.cache.store import LRUByteStore
from services.common.kv_wire import MalformedStream, from_chunks, to_chunks

MAX_KEY_BYTES = 1024
MAX_LAYOUT_BYTES = 256
MAX_HASHES = 65536
INDEX_CHUNK = 8192  # block hashes per KvIndexUpdate of a snapshot

CACHE_BYTES = Gauge("llmmesh_cache_bytes", "Bytes held by the cache", ["store"])
CACHE_QUERIES = Counter("llmmesh_cache_queries", "Cache lookups", ["store"])
CACHE_HITS = Counter("llmmesh_cache_hits", "Cache lookups that found an entry", ["store"])
CACHE_EVICTIONS = Counter("llmmesh_cache_evictions", "Entries evicted to stay in budget", ["store"])


def kv_key(layout: str, block_hash: bytes) -> bytes:
    return layout.encode() + b"\0" + block_hash


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, responses: LRUByteStore, kv_blocks: LRUByteStore):
        self.responses = responses
        self.kv_blocks = kv_blocks
        self._index_watchers: dict[bytes, set[asyncio.Queue]] = {}  # layout -> WatchKvIndex streams
        kv_blocks.listener = self._kv_changed

    def _kv_changed(self, key: bytes, held: bool) -> None:
        layout, _, block_hash = key.partition(b"\0")
        for queue in self._index_watchers.get(layout, ()):
            queue.put_nowait((block_hash, held))

    async def GetResponse(self, request: cache_pb2.GetResponseRequest, context: grpc.aio.ServicerContext):
        await self._check_key(request.key, context)
        value = self.responses.get(request.key)
        CACHE_QUERIES.labels("response").inc()
        if value is None:
            return cache_pb2.GetResponseReply(found=False)
        CACHE_HITS.labels("response").inc()
        return cache_pb2.GetResponseReply(found=True, value=value)

    async def PutResponse(self, request: cache_pb2.PutResponseRequest, context: grpc.aio.ServicerContext):
        await self._check_key(request.key, context)
        before = self.responses.stats().evictions
        stored = self.responses.put(request.key, request.value)
        stats = self.responses.stats()
        CACHE_EVICTIONS.labels("response").inc(stats.evictions - before)
        CACHE_BYTES.labels("response").set(stats.bytes)
        return cache_pb2.PutResponseReply(stored=stored)

    async def PutKvBlocks(self, request_iterator, context: grpc.aio.ServicerContext):
        stored = refused = 0
        try:
            async for layout, block_hash, value, retain in from_chunks(request_iterator):
                self._check_block_name(layout, block_hash)
                before = self.kv_blocks.stats().evictions
                if self.kv_blocks.put(kv_key(layout, block_hash), value, retain):
                    stored += 1
                else:
                    refused += 1
                CACHE_EVICTIONS.labels("kv").inc(self.kv_blocks.stats().evictions - before)
        except MalformedStream as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        CACHE_BYTES.labels("kv").set(self.kv_blocks.stats().bytes)
        CACHE_BYTES.labels("kv_retained").set(self.kv_blocks.retained_bytes)  # stored conversations' (within kv)
        return cache_pb2.PutKvBlocksReply(stored=stored, refused=refused)

    async def GetKvBlocks(self, request: cache_pb2.GetKvBlocksRequest, context: grpc.aio.ServicerContext):
        if len(request.block_hashes) > MAX_HASHES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_HASHES} block hashes per call")
        try:
            for block_hash in request.block_hashes:
                self._check_block_name(request.layout, block_hash)
        except MalformedStream as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for block_hash in request.block_hashes:
            CACHE_QUERIES.labels("kv").inc()
            value = self.kv_blocks.get(kv_key(request.layout, block_hash))
            if value is None:
                return
            CACHE_HITS.labels("kv").inc()
            for chunk in to_chunks(request.layout, [(block_hash, value)]):
                yield chunk

    async def WatchKvIndex(self, request: cache_pb2.WatchKvIndexRequest, context: grpc.aio.ServicerContext):
        try:
            self._check_layout(request.layout)
        except MalformedStream as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        layout = request.layout.encode()
        queue: asyncio.Queue = asyncio.Queue()
        watchers = self._index_watchers.setdefault(layout, set())
        watchers.add(queue)  # before the snapshot, in the same turn of the loop: no change falls between
        try:
            prefix = layout + b"\0"
            held = [key[len(prefix):] for key in self.kv_blocks.keys() if key.startswith(prefix)]
            for start in range(0, max(len(held), 1), INDEX_CHUNK):
                yield cache_pb2.KvIndexUpdate(reset=start == 0, added=held[start:start + INDEX_CHUNK])
            while True:
                changes = [await queue.get()]
                while not queue.empty():
                    changes.append(queue.get_nowait())
                latest = dict(changes)  # a block stored then evicted in one batch ends evicted
                yield cache_pb2.KvIndexUpdate(added=[h for h, now in latest.items() if now],
                                              removed=[h for h, now in latest.items() if not now])
        finally:
            watchers.discard(queue)
            if not watchers:
                self._index_watchers.pop(layout, None)

    async def Stats(self, request, context):
        s, kv = self.responses.stats(), self.kv_blocks.stats()
        return cache_pb2.CacheStats(
            entries=s.entries, bytes=s.bytes, budget_bytes=self.responses.budget_bytes,
            lookups=s.lookups, hits=s.hits, evictions=s.evictions,
            kv_blocks=kv.entries, kv_bytes=kv.bytes, kv_budget_bytes=self.kv_blocks.budget_bytes,
            kv_lookups=kv.lookups, kv_hits=kv.hits, kv_evictions=kv.evictions,
        )

    @staticmethod
    def _check_layout(layout: str) -> None:
        if not layout or len(layout.encode()) > MAX_LAYOUT_BYTES or "\0" in layout:
            raise MalformedStream(f"layout must be 1..{MAX_LAYOUT_BYTES} bytes without NUL")

    @classmethod
    def _check_block_name(cls, layout: str, block_hash: bytes) -> None:
        cls._check_layout(layout)
        if not block_hash or len(block_hash) > MAX_KEY_BYTES:
            raise MalformedStream(f"block_hash must be 1..{MAX_KEY_BYTES} bytes")

    @staticmethod
    async def _check_key(key: bytes, context) -> None:
        if not key or len(key) > MAX_KEY_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"key must be 1..{MAX_KEY_BYTES} bytes")
