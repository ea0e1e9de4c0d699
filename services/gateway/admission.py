"""Admission, the first stage of a request: whether and when a tenant's request may run, and what it is
charged once it ran.

In order: the tenant's rate limit (requests per second), its priority (the API key's policy allows
or lowers what was asked), then its line (at most max_concurrent requests of the tenant in flight;
the rest wait, in order, within their deadline). Refusals are RpcErrors that both fronts translate:
RESOURCE_EXHAUSTED with a retry-after, INVALID_ARGUMENT, DEADLINE_EXCEEDED. Transport-free: tested
in-process (tests/test_gateway_stages.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from llmmesh.v1 import common_pb2, gateway_pb2
from services.common.errors import retry_later
from services.common.labels import BoundedLabels
from services.gateway.auth import ApiKeys
from services.gateway.errors import RpcError
from services.gateway.rate_limit import RateLimited, TenantRateLimiter
from services.gateway.tenants import PRIORITY_CLASSES, PolicyError, TenantGate, TenantQueueFull

TENANT_TOKENS = Counter("llmmesh_tenant_generation_tokens", "Completion tokens returned, by tenant", ["tenant"])
TENANT_WAIT = Histogram("llmmesh_tenant_gateway_queue_seconds", "Time in the tenant's line at the gateway "
                        "(its max_concurrent)", ["tenant"], buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
RATE_LIMITED = Counter("llmmesh_rate_limited_requests", "Requests refused by the per-tenant rate limit, by tenant",
                       ["tenant"])
TENANT_RUNNING = Gauge("llmmesh_tenant_gateway_requests_running", "Requests in flight at the gateway, by tenant",
                       ["tenant"])


@dataclass(frozen=True)
class Admitted:
    """A request let in: its resolved priority, its tenant's weight, and the time it has left."""

    priority: int
    weight: float
    timeout_s: float


class Admission:
    def __init__(self, api_keys: ApiKeys, rate_limiter: TenantRateLimiter, gate: TenantGate | None = None):
        self.api_keys = api_keys
        self.rate_limiter = rate_limiter
        self.gate = gate or TenantGate()
        self.tenant_label = BoundedLabels(known=(*api_keys.tenants, "anonymous"))

    @contextlib.asynccontextmanager
    async def admit(self, request: gateway_pb2.GenerateRequest, tenant: str,
                    timeout_s: float) -> AsyncIterator[Admitted]:
        """Held while the request runs. Sets request.priority to the resolved class (the audit line
        reports it); raises RpcError when the request may not run."""
        try:
            self.rate_limiter.admit(tenant)
        except RateLimited as exc:
            RATE_LIMITED.labels(self.tenant_label(tenant)).inc()
            refusal = retry_later(str(exc), round(exc.retry_after_s, 3))
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details, refusal.trailing_metadata,
                           retry_after_s=exc.retry_after_s) from None
        policy = self.api_keys.policy(tenant)
        try:
            priority = policy.resolve_priority(request.priority if request.HasField("priority") else None, tenant)
        except PolicyError as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        request.priority = priority
        trace.get_current_span().set_attribute("llmmesh.priority", PRIORITY_CLASSES[priority])
        label = self.tenant_label(tenant)
        async with self._line(tenant, policy, timeout_s) as waited:
            TENANT_WAIT.labels(label).observe(waited)
            TENANT_RUNNING.labels(label).inc()
            try:
                yield Admitted(priority, policy.weight, timeout_s - waited)
            finally:
                TENANT_RUNNING.labels(label).dec()

    def charge(self, tenant: str, usage: common_pb2.Usage | None) -> None:
        """After the request: its tokens count against the tenant's tokens-per-minute and metrics
        (an answer replayed from the response cache cost the model nothing)."""
        if usage is None or usage.from_response_cache:
            return
        self.rate_limiter.charge_tokens(tenant, usage.prompt_tokens + usage.completion_tokens)
        TENANT_TOKENS.labels(self.tenant_label(tenant)).inc(usage.completion_tokens)

    @contextlib.asynccontextmanager
    async def _line(self, tenant: str, policy, timeout_s: float):
        """The tenant's line (its max_concurrent): yields the seconds waited in it."""
        entered = False
        try:
            async with self.gate.enter(tenant, policy, timeout_s) as waited:
                entered = True
                yield waited
        except TenantQueueFull as exc:
            refusal = retry_later(str(exc), 1.0)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details, refusal.trailing_metadata,
                           retry_after_s=1.0) from None
        except TimeoutError:
            if entered:  # the request's own, not the line's
                raise
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed while tenant {tenant!r}'s "
                           f"{policy.max_concurrent} requests in flight ran (its max_concurrent)") from None
