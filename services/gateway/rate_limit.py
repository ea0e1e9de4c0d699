"""Per-tenant rate limits: requests per second and tokens per minute, as token buckets.

Tokens (prompt + completion) are charged when a request finishes, so a burst can overdraw the
bucket; the tenant then waits until it refills. Off when both rates are 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class RateLimited(Exception):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    rate: float  # units per second
    capacity: float
    level: float
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now


class TenantRateLimiter:
    def __init__(self, requests_per_s: float = 0.0, tokens_per_min: float = 0.0, burst_s: float = 1.0,
                 clock=time.monotonic):
        self.requests_per_s = requests_per_s
        self.tokens_per_s = tokens_per_min / 60.0
        self.burst_s = burst_s
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 or self.tokens_per_s > 0

    def _bucket(self, table: dict, tenant: str, rate: float, capacity: float) -> _Bucket:
        bucket = table.get(tenant)
        if bucket is None:
            bucket = table[tenant] = _Bucket(rate, capacity, capacity, self._clock())
        bucket.refill(self._clock())
        return bucket

    def admit(self, tenant: str) -> None:
        """Take one request from the tenant's allowance, or raise RateLimited (nothing taken)."""
        tokens = None
        if self.tokens_per_s > 0:
            tokens = self._bucket(self._tokens, tenant, self.tokens_per_s, self.tokens_per_s * 60)
            if tokens.level <= 0:
                wait = -tokens.level / self.tokens_per_s + 1 / self.tokens_per_s
                raise RateLimited(f"tenant {tenant!r} used its {self.tokens_per_s * 60:g} tokens per minute", wait)
        if self.requests_per_s > 0:
            requests = self._bucket(self._requests, tenant, self.requests_per_s,
                                    max(1.0, self.requests_per_s * self.burst_s))
            if requests.level < 1:
                wait = (1 - requests.level) / self.requests_per_s
                raise RateLimited(f"tenant {tenant!r} is over {self.requests_per_s:g} requests per second", wait)
            requests.level -= 1

    def charge_tokens(self, tenant: str, n: int) -> None:
        if self.tokens_per_s > 0 and n > 0:
            self._bucket(self._tokens, tenant, self.tokens_per_s, self.tokens_per_s * 60).level -= n
