"""What this gateway knows of its backends' health, as metrics: llmmesh_backend_up{backend, address}.

The alerts on unreachable tokenizers and caches and on shard replicas that are down or not serving
read this gauge, so they say what the gateway sees (a replica Prometheus can scrape but the gateway
cannot reach is down all the same). Values are read at scrape time from the state the gateway keeps
for routing, so a replica removed by discovery disappears from the exposition with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.gateway.readiness import probe_health
from services.gateway.shards import ShardPool
from services.gateway.tokenizers import TokenizerReplicas


class CacheProbes:
    """grpc.health.v1 probes of each cache replica. The gateway serves without a cache (it computes
    what it would have found), so these feed only the metric, not the gateway's readiness."""

    def __init__(self, channels: dict[str, grpc.aio.Channel]):
        self.channels = channels
        self.up: dict[str, bool] = dict.fromkeys(channels, False)

    def start(self) -> list[asyncio.Task]:
        loop = asyncio.get_running_loop()
        return [loop.create_task(probe_health(channel, self._reporter(address)))
                for address, channel in self.channels.items()]

    def _reporter(self, address: str) -> Callable[[bool], None]:
        def report(up: bool) -> None:
            self.up[address] = up
        return report


class BackendHealthCollector(Collector):
    def __init__(self, tokenizer: TokenizerReplicas, caches: CacheProbes, shards: ShardPool):
        self.tokenizer, self.caches, self.shards = tokenizer, caches, shards

    def collect(self):
        family = GaugeMetricFamily("llmmesh_backend_up", "1 while this gateway's health checks of a backend "
                                   "replica succeed (shards: while it reports SERVING), else 0",
                                   labels=["backend", "address"])
        for address, up in zip(self.tokenizer.addresses, list(self.tokenizer.up)):
            family.add_metric(["tokenizer", address], float(up))
        for address, up in list(self.caches.up.items()):
            family.add_metric(["cache", address], float(up))
        for replica in list(self.shards.replicas):
            family.add_metric(["shard", replica.address], float(replica.serving))
        yield family
