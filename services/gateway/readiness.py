"""The gateway's readiness: it can serve only while every service it needs can.

Shards report through ShardPool; the tokenizer (and anything else without replicas to route
around) is probed here with grpc.health.v1 Check calls on a short deadline, so a crashed service
and a hung one (a stopped process keeps its connections open) are both noticed within a probe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


class Readiness:
    """Named dependencies, each up or down; on_change(all_up) runs whenever the whole changes."""

    def __init__(self, on_change: Callable[[bool], Awaitable[None]]):
        self._on_change = on_change
        self._up: dict[str, bool] = {}
        self._tasks: set[asyncio.Task] = set()
        self._reported = True

    @property
    def ready(self) -> bool:
        return all(self._up.values())

    def set(self, name: str, up: bool) -> None:
        if self._up.get(name) != up:
            log.log(logging.INFO if up else logging.WARNING, "%s is %s", name, "up" if up else "down")
        self._up[name] = up
        if self.ready != self._reported:
            self._reported = self.ready
            task = asyncio.get_running_loop().create_task(self._on_change(self._reported))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def probe_health(channel: grpc.aio.Channel, report: Callable[[bool], None], interval_s: float = 0.5,
                       timeout_s: float = 1.0) -> None:
    """Forever: Check the service's health every interval_s and report whether it serves; a check that
    fails or takes over timeout_s reports False."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    while True:
        try:
            reply = await stub.Check(request, timeout=timeout_s)
            report(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            report(False)
        await asyncio.sleep(interval_s)
