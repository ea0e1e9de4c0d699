"""What each tenant may ask of the mesh: its priority class, its weight, and how many of its requests
run at once (the next ones wait in line, in order, up to a bound).

A keys-file line may carry the tenant's policy after the key's hash:
    acme  SHA256HEX  priority=interactive weight=2 max_concurrent=16 max_queued=64
priority is the tenant's own class and its ceiling: a request may ask for a lower class (a larger
number), never a higher one. weight is its share against other tenants of the same class on a busy
shard. max_concurrent (0: no cap) bounds its requests in flight at this gateway; max_queued more wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass

PRIORITY_CLASSES = ("interactive", "standard", "batch")  # class 0, 1, 2: lower goes first


class TenantQueueFull(Exception):
    """Becomes RESOURCE_EXHAUSTED: the tenant's line is at its bound."""


class PolicyError(ValueError):
    """A request asks for what its tenant may not have; becomes INVALID_ARGUMENT."""


@dataclass(frozen=True)
class TenantPolicy:
    priority: int = 0  # the tenant's class and ceiling
    weight: float = 1.0
    max_concurrent: int = 0  # 0: no cap
    max_queued: int = 256

    @classmethod
    def parse(cls, fields: list[str], where: str) -> "TenantPolicy":
        """From `name=value` fields of a keys-file line; ValueError naming the line otherwise."""
        values: dict = {}
        for item in fields:
            name, _, value = item.partition("=")
            try:
                if name == "priority":
                    values[name] = class_number(value)
                elif name == "weight":
                    values[name] = float(value)
                    if not 0 < values[name] < math.inf:
                        raise ValueError("weight must be a positive number")
                elif name in ("max_concurrent", "max_queued"):
                    values[name] = int(value)
                    if values[name] < 0:
                        raise ValueError(f"{name} must be >= 0")
                else:
                    raise ValueError(f"unknown field {name!r} (priority, weight, max_concurrent, max_queued)")
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return cls(**values)

    def resolve_priority(self, requested: int | None, tenant: str) -> int:
        """The class a request runs in: its own if it asked for one its tenant may use, else the tenant's."""
        if requested is None:
            return self.priority
        if requested >= len(PRIORITY_CLASSES):
            raise PolicyError(f"priority {requested} is not a class: {_classes()}")
        if requested < self.priority:
            raise PolicyError(f"priority {requested} ({PRIORITY_CLASSES[requested]}) is above the ceiling of tenant "
                              f"{tenant!r}, {self.priority} ({PRIORITY_CLASSES[self.priority]})")
        return requested


def class_number(value: str) -> int:
    """A class by name or number."""
    if value in PRIORITY_CLASSES:
        return PRIORITY_CLASSES.index(value)
    if value.isdigit() and int(value) < len(PRIORITY_CLASSES):
        return int(value)
    raise ValueError(f"priority {value!r} is not a class: {_classes()}")


def _classes() -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(PRIORITY_CLASSES))


class TenantGate:
    """Per tenant, at most max_concurrent requests in flight; the next ones wait in arrival order."""

    def __init__(self):
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.queued: Counter[str] = Counter()
        self.running: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def enter(self, tenant: str, policy: TenantPolicy, timeout_s: float):
        """Yields the seconds the request waited. TenantQueueFull when the line is full; TimeoutError
        when the request's time ran out in it."""
        if not policy.max_concurrent:
            self.running[tenant] += 1
            try:
                yield 0.0
            finally:
                self.running[tenant] -= 1
            return
        slots = self._slots.setdefault(tenant, asyncio.Semaphore(policy.max_concurrent))
        start = time.monotonic()
        if slots.locked():
            if self.queued[tenant] >= policy.max_queued:
                raise TenantQueueFull(f"tenant {tenant!r} has {policy.max_concurrent} requests running and "
                                      f"{self.queued[tenant]} waiting, its bound")
        self.queued[tenant] += 1
        try:
            async with asyncio.timeout(timeout_s):
                await slots.acquire()
        finally:
            self.queued[tenant] -= 1
        self.running[tenant] += 1
        try:
            yield time.monotonic() - start
        finally:
            self.running[tenant] -= 1
            slots.release()
