"""The model shard replicas behind the gateway: long-lived channels, load, health, failure back-off.

Each replica's grpc.health.v1 status is watched (a Watch stream per replica), so a draining or
dead shard stops receiving new requests at once; a replica that fails a call is also backed off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import shard_pb2, shard_pb2_grpc
from services.common.channels import make_channel
from services.common.tls import TlsFiles
from services.gateway.shard_batches import ShardBatchStream

log = logging.getLogger(__name__)
SHARD_SERVICE = shard_pb2.DESCRIPTOR.services_by_name["ModelShard"].full_name


class NoShardAvailable(Exception):
    """Becomes UNAVAILABLE."""


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel = field(repr=False)
    stub: shard_pb2_grpc.ModelShardStub = field(repr=False)
    outstanding: int = 0
    by_tenant: Counter = field(default_factory=Counter, repr=False)  # outstanding calls of each tenant
    down_until: float = 0.0  # monotonic seconds; tried only as a last resort before then
    # Its health status, as watched. Not serving until its first answer: a gateway whose shards have
    # not answered yet is not ready, and tries them only as a last resort.
    serving: bool = False
    # The shard's own account of the KV blocks it holds (index keys, see WatchPrefixIndex); None
    # until its first snapshot arrives, or while the stream is down.
    prefix_index: set[int] | None = field(default=None, repr=False)
    # Its requests' GenerateBatch stream (None: one Generate call per request).
    batches: ShardBatchStream | None = field(default=None, repr=False)

    @property
    def suspect(self) -> bool:
        return not self.serving or time.monotonic() < self.down_until

    def begin(self, tenant: str) -> None:
        """A call of tenant's starts here."""
        self.outstanding += 1
        self.by_tenant[tenant] += 1

    def end(self, tenant: str) -> None:
        self.outstanding -= 1
        self.by_tenant[tenant] -= 1
        if self.by_tenant[tenant] <= 0:
            del self.by_tenant[tenant]


class ShardPool:
    def __init__(self, addresses: list[str], backoff_s: float = 2.0, tls: TlsFiles | None = None,
                 dynamic: bool = False, drain_grace_s: float = 600.0, batched: bool = True, token: str | None = None):
        """dynamic: replicas come and go through set_addresses (discovery); it may start empty.
        batched: a replica's requests share one GenerateBatch stream (else one Generate call each).
        token: the mesh's internal token, sent on every call to a replica."""
        self.batched = batched
        if not addresses and not dynamic:
            raise ValueError("at least one model shard address is needed")
        self.tls, self.token = tls, token
        self.replicas = [self._replica(a) for a in addresses]
        self.backoff_s = backoff_s
        self.drain_grace_s = drain_grace_s
        self._info: shard_pb2.ShardInfo | None = None
        self._info_lock = asyncio.Lock()
        self._watchers: dict[str, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self._started = False
        # Called with whether any replica serves after each change of a replica's health or of the
        # set: the gateway's readiness keeps the state.
        self.on_availability: Callable[[bool], None] | None = None

    @property
    def available(self) -> bool:
        return any(r.serving for r in self.replicas)

    def _report_availability(self) -> None:
        if self.on_availability is not None:
            self.on_availability(self.available)

    def _replica(self, address: str) -> Replica:
        channel = make_channel(address, self.tls, self.token)
        stub = shard_pb2_grpc.ModelShardStub(channel)
        return Replica(address, channel, stub, batches=ShardBatchStream(stub, address) if self.batched else None)

    def start(self) -> None:
        """Begin watching every replica's health (call inside the running event loop)."""
        self._started = True
        for r in self.replicas:
            self._watchers[r.address] = asyncio.get_running_loop().create_task(self._watch_all(r))

    def set_addresses(self, addresses: list[str]) -> None:
        """Make the pool exactly these replicas (event-loop thread). New ones are added and watched;
        a removed one takes no new requests, and its channel closes once its streams finish."""
        wanted = list(dict.fromkeys(addresses))
        current = {r.address: r for r in self.replicas}
        for address in wanted:
            if address not in current:
                replica = self._replica(address)
                self.replicas.append(replica)
                if self._started:
                    self._watchers[address] = asyncio.get_running_loop().create_task(self._watch_all(replica))
                log.info("shard %s added", address)
        for address, replica in current.items():
            if address not in wanted:
                self.replicas.remove(replica)
                watcher = self._watchers.pop(address, None)
                if watcher is not None:
                    watcher.cancel()
                if replica.batches is not None:
                    replica.batches.finish()
                task = asyncio.get_running_loop().create_task(replica.channel.close(self.drain_grace_s))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                log.info("shard %s removed", address)
        self._report_availability()

    async def _watch_all(self, replica: Replica) -> None:
        await asyncio.gather(self._watch(replica), self._watch_prefix_index(replica))

    async def _watch_prefix_index(self, replica: Replica) -> None:
        """Mirror the shard's prefix index (it streams a snapshot, then changes)."""
        while True:
            try:
                async for update in replica.stub.WatchPrefixIndex(shard_pb2.WatchPrefixIndexRequest(),
                                                                  wait_for_ready=True):
                    if update.reset or replica.prefix_index is None:
                        replica.prefix_index = set(update.added)
                    else:
                        replica.prefix_index.update(update.added)
                    replica.prefix_index.difference_update(update.removed)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older shard: route by our own memory
                    return
            replica.prefix_index = None
            await asyncio.sleep(self.backoff_s)

    async def _watch(self, replica: Replica) -> None:
        stub = health_pb2_grpc.HealthStub(replica.channel)
        request = health_pb2.HealthCheckRequest(service=SHARD_SERVICE)
        while True:
            try:
                # wait_for_ready: while the shard is unreachable this waits on the channel, not a clock.
                async for reply in stub.Watch(request, wait_for_ready=True):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != replica.serving:
                        log.info("shard %s is %s", replica.address, "serving" if serving else "not serving")
                    replica.serving = serving
                    self._report_availability()
            except grpc.aio.AioRpcError:
                pass
            replica.serving = False
            self._report_availability()
            await asyncio.sleep(self.backoff_s)  # the stream ended (shard stopped): reconnect after a pause

    def ordered(self, tenant: str = "") -> list[Replica]:
        """Replicas to try, best first: healthy before suspect, then fewest outstanding calls of this
        tenant (a tenant's load spreads over the replicas), then fewest of all."""
        return sorted(self.replicas, key=lambda r: (r.suspect, r.by_tenant[tenant], r.outstanding))

    def mark_down(self, replica: Replica) -> None:
        replica.down_until = time.monotonic() + self.backoff_s

    def mark_up(self, replica: Replica) -> None:
        replica.down_until = 0.0

    async def info(self, timeout: float) -> shard_pb2.ShardInfo:
        """The shards' limits (they serve one model with one configuration), asked once."""
        if self._info is not None:
            return self._info
        async with self._info_lock:
            errors = []
            for replica in self.ordered():
                if self._info is not None:
                    break
                try:
                    self._info = await replica.stub.Info(shard_pb2.ShardInfoRequest(), timeout=timeout)
                    self.mark_up(replica)
                except grpc.aio.AioRpcError as exc:
                    self.mark_down(replica)
                    errors.append(f"{replica.address}: {exc.code().name}")
            if self._info is None:
                raise NoShardAvailable(f"no model shard answered ({'; '.join(errors)})")
        return self._info

    async def close(self) -> None:
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(r.channel.close() for r in self.replicas), *self._closing, return_exceptions=True)
