"""gRPC front of the cache service."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge

from llmmesh.v1 import cache_pb2, cache_pb2_grpc
from services.cache.store import LRUByteStore

MAX_KEY_BYTES = 1024

CACHE_BYTES = Gauge("llmmesh_cache_bytes", "Bytes held by the cache", ["store"])
CACHE_QUERIES = Counter("llmmesh_cache_queries", "Cache lookups", ["store"])
CACHE_HITS = Counter("llmmesh_cache_hits", "Cache lookups that found an entry", ["store"])
CACHE_EVICTIONS = Counter("llmmesh_cache_evictions", "Entries evicted to stay in budget", ["store"])


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, responses: LRUByteStore):
        self.responses = responses

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

    async def Stats(self, request, context):
        s = self.responses.stats()
        return cache_pb2.CacheStats(
            entries=s.entries, bytes=s.bytes, budget_bytes=self.responses.budget_bytes,
            lookups=s.lookups, hits=s.hits, evictions=s.evictions,
        )

    @staticmethod
    async def _check_key(key: bytes, context) -> None:
        if not key or len(key) > MAX_KEY_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"key must be 1..{MAX_KEY_BYTES} bytes")
