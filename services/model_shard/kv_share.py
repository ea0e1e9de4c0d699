"""The shard's side of the mesh's shared KV prefix blocks (held by the cache service's replicas).

Before a prompt is queued, the leading full blocks missing from the shard's own prefix cache are
fetched, with a short timeout, and adopted by the engine; the prompt then prefills only the rest.
After a prefill, its new full blocks are uploaded in the background, off the token path.
A cache that is slow, down or wrong never fails a request: the shard computes instead.

Blocks are spread over cache replicas by consistent hashing of their chained hash, so a prefix's
blocks may live on several replicas; each is asked for its share in one parallel round trip. Each
replica's index of the blocks it holds is followed (WatchKvIndex), so only blocks a replica holds are
asked for: a prompt no replica has computed costs no round trip. A replica whose index is not
known (its stream is down, or it predates the index) is asked as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import torch
from prometheus_client import Counter, Gauge

from llmmesh.v1 import cache_pb2, cache_pb2_grpc
from services.common.hash_ring import HashRing
from services.common.kv_wire import MalformedStream, from_chunks, to_chunks

log = logging.getLogger(__name__)

KV_FETCHED_BLOCKS = Counter("llmmesh_kv_fetched_blocks", "KV blocks fetched from the cache service")
KV_FETCHED_BYTES = Counter("llmmesh_kv_fetched_bytes", "Bytes of KV blocks fetched from the cache service")
KV_FETCH_FAILURES = Counter("llmmesh_kv_fetch_failures", "Fetches from a cache replica that failed (then computed)",
                            ["reason"])
KV_UPLOADED_BLOCKS = Counter("llmmesh_kv_uploaded_blocks", "KV blocks uploaded to the cache service")
KV_UPLOADED_BYTES = Counter("llmmesh_kv_uploaded_bytes", "Bytes of KV blocks uploaded to the cache service")
KV_UPLOAD_DROPPED = Counter("llmmesh_kv_upload_dropped_blocks",
                            "KV blocks not uploaded: backlog full or cache unreachable")
KV_UPLOAD_BACKLOG = Gauge("llmmesh_kv_upload_backlog_bytes", "Bytes of KV blocks waiting for upload")
KV_INDEX_BLOCKS = Gauge("llmmesh_kv_index_blocks", "KV blocks the cache replicas hold, as their indexes say")
KV_FETCHES_SKIPPED = Counter("llmmesh_kv_fetches_skipped", "Prompts whose missing blocks no cache replica "
                             "holds, so not asked for (no round trip)")


@dataclass
class FetchResult:
    values: list[bytes] = field(default_factory=list)  # the leading run of blocks found
    bytes: int = 0
    errors: list[str] = field(default_factory=list)  # one per replica that failed, e.g. "DEADLINE_EXCEEDED"


class SharedKvBlocks:
    def __init__(self, ring: HashRing[cache_pb2_grpc.CacheStub], layout: str, fetch_timeout_s: float = 0.5,
                 upload_timeout_s: float = 10.0, max_backlog_bytes: int = 256 << 20, known_capacity: int = 200_000,
                 backoff_s: float = 5.0, channels: list[grpc.aio.Channel] | None = None):
        """backoff_s: a replica that timed out or was unreachable is not asked again for this long,
        so an outage costs one fetch timeout, not one per request. channels: the stubs' channels,
        closed by stop()."""
        self.ring = ring
        self._channels = list(channels or [])
        self.backoff_s = backoff_s
        self._down_until: dict[str, float] = {}  # replica -> monotonic time it may be asked again
        self.layout = layout
        self.fetch_timeout_s = fetch_timeout_s
        self.upload_timeout_s = upload_timeout_s
        self.max_backlog_bytes = max_backlog_bytes
        self._known: OrderedDict[bytes, None] = OrderedDict()  # hashes the cache has from us (LRU)
        self._known_capacity = known_capacity
        self._backlog: asyncio.Queue[tuple[bytes, bytes, bool]] = asyncio.Queue()  # (hash, value, retain)
        self._backlog_bytes = 0
        self._uploader: asyncio.Task | None = None
        self._held: dict[str, set[bytes]] = {}  # replica -> the blocks its index says it holds
        self._index_watchers: list[asyncio.Task] = []

    # --- fetch ---

    def held_prefix(self, block_hashes: list[bytes]) -> int:
        """How many leading blocks the cache replicas may hold: those their indexes list, or whose
        replica's index is not known."""
        for i, block_hash in enumerate(block_hashes):
            held = self._held.get(self.ring.owner(block_hash))
            if held is not None and block_hash not in held:
                return i
        return len(block_hashes)

    async def fetch(self, block_hashes: list[bytes]) -> FetchResult:
        """The values of the longest leading run of block_hashes that the cache replicas hold."""
        if not block_hashes or not len(self.ring):
            return FetchResult()
        groups = self.ring.group(block_hashes)
        found: dict[int, bytes] = {}
        result = FetchResult()
        replies = await asyncio.gather(*(self._fetch_from(owner, [block_hashes[i] for i in idx])
                                         for owner, idx in groups.items()))
        for (owner, idx), (values, error) in zip(groups.items(), replies):
            found.update(zip(idx, values))
            if error:
                result.errors.append(f"{owner}: {error}")
        for i in range(len(block_hashes)):
            if i not in found:
                break
            result.values.append(found[i])
        result.bytes = sum(len(v) for v in result.values)
        self._remember(block_hashes[: len(result.values)])
        if len(result.values) < len(block_hashes):  # evicted there: upload it again when computed
            self._known.pop(block_hashes[len(result.values)], None)
        KV_FETCHED_BLOCKS.inc(len(result.values))
        KV_FETCHED_BYTES.inc(result.bytes)
        return result

    async def _fetch_from(self, owner: str, hashes: list[bytes]) -> tuple[list[bytes], str | None]:
        """The leading run of hashes held by one replica, and why it stopped early if it failed."""
        values: list[bytes] = []
        if time.monotonic() < self._down_until.get(owner, 0.0):
            KV_FETCH_FAILURES.labels("BACKING_OFF").inc()
            return values, "BACKING_OFF"
        try:
            request = cache_pb2.GetKvBlocksRequest(layout=self.layout, block_hashes=hashes)
            stream = self.ring.node(owner).GetKvBlocks(request, timeout=self.fetch_timeout_s)
            async for _, block_hash, value, _ in from_chunks(stream):
                if len(values) >= len(hashes) or block_hash != hashes[len(values)]:
                    raise MalformedStream("the cache sent a block that was not asked for next")
                values.append(value)
            return values, None
        except grpc.aio.AioRpcError as exc:
            KV_FETCH_FAILURES.labels(exc.code().name).inc()
            self._mark_down(owner, exc)
            return values, exc.code().name
        except MalformedStream as exc:
            KV_FETCH_FAILURES.labels("MALFORMED").inc()
            log.warning("cache replica %s sent a malformed KV stream: %s", owner, exc)
            return [], "MALFORMED"

    async def _follow_index(self, owner: str) -> None:
        """Mirror one replica's index; while its stream is down the replica is asked as before."""
        request = cache_pb2.WatchKvIndexRequest(layout=self.layout)
        while True:
            try:
                async for update in self.ring.node(owner).WatchKvIndex(request, wait_for_ready=True):
                    held = set() if update.reset else self._held.setdefault(owner, set())
                    held.update(update.added)
                    held.difference_update(update.removed)
                    self._held[owner] = held
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older cache: ask it for every prompt
                    self._held.pop(owner, None)
                    return
            self._held.pop(owner, None)
            await asyncio.sleep(self.backoff_s)

    # --- upload ---

    def offer(self, block_hashes: list[bytes], data: torch.Tensor, retain: list[bool] | None = None) -> None:
        """Queue new prompt blocks for upload (event-loop thread). data: uint8 [n, bytes per block];
        retain: which are a stored conversation's (kept longest by the cache). Beyond the backlog
        budget blocks are dropped: the cache is an optimisation."""
        for i, block_hash in enumerate(block_hashes):
            if block_hash in self._known:
                continue
            value = data[i].numpy().tobytes()
            if self._backlog_bytes + len(value) > self.max_backlog_bytes:
                KV_UPLOAD_DROPPED.inc()
                continue
            self._backlog_bytes += len(value)
            self._backlog.put_nowait((block_hash, value, bool(retain and retain[i])))
        KV_UPLOAD_BACKLOG.set(self._backlog_bytes)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._uploader = loop.create_task(self._upload_forever(), name="kv-upload")
        self._index_watchers = [loop.create_task(self._follow_index(owner), name=f"kv-index {owner}")
                                for owner in self.ring.names]
        KV_INDEX_BLOCKS.set_function(lambda: sum(len(held) for held in self._held.values()))  # at scrape time

    async def stop(self) -> None:
        tasks = [t for t in (self._uploader, *self._index_watchers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closed inside the loop: a grpc.aio channel left to interpreter exit can crash the process.
        await asyncio.gather(*(channel.close() for channel in self._channels), return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every offered block has been sent (or dropped)."""
        await self._backlog.join()

    async def _upload_forever(self) -> None:
        while True:
            batch = [await self._backlog.get()]
            while not self._backlog.empty():
                batch.append(self._backlog.get_nowait())
            try:
                await self._upload(batch)
            except Exception:  # noqa: BLE001 - the uploader must outlive any one failure
                log.exception("KV block upload failed")
            finally:
                self._backlog_bytes -= sum(len(v) for _, v, _ in batch)
                KV_UPLOAD_BACKLOG.set(self._backlog_bytes)
                for _ in batch:
                    self._backlog.task_done()

    async def _upload(self, batch: list[tuple[bytes, bytes, bool]]) -> None:
        groups = self.ring.group(h for h, _, _ in batch)
        retained = {h for h, _, retain in batch if retain}

        async def put(owner: str, blocks: list[tuple[bytes, bytes]]) -> None:
            if time.monotonic() < self._down_until.get(owner, 0.0):
                KV_UPLOAD_DROPPED.inc(len(blocks))
                return
            try:
                await self.ring.node(owner).PutKvBlocks(to_chunks(self.layout, blocks, retained),
                                                        timeout=self.upload_timeout_s)
            except grpc.aio.AioRpcError as exc:
                self._mark_down(owner, exc)
                KV_UPLOAD_DROPPED.inc(len(blocks))
                log.info("KV upload to %s failed: %s", owner, exc.code().name)
                return
            self._remember([h for h, _ in blocks])
            KV_UPLOADED_BLOCKS.inc(len(blocks))
            KV_UPLOADED_BYTES.inc(sum(len(v) for _, v in blocks))

        await asyncio.gather(*(put(owner, [batch[i][:2] for i in idx]) for owner, idx in groups.items()))

    def _mark_down(self, owner: str, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            self._down_until[owner] = time.monotonic() + self.backoff_s
            log.info("cache replica %s: %s; not asked for KV blocks for %.0fs", owner, exc.code().name, self.backoff_s)

    def _remember(self, block_hashes: list[bytes]) -> None:
        for h in block_hashes:
            self._known[h] = None
            self._known.move_to_end(h)
        while len(self._known) > self._known_capacity:
            self._known.popitem(last=False)
