"""Calls to model shards from the gateway: open a stream on the best replica that answers, read it,
and tell a lost shard (resumable elsewhere) from a failed request (not) and from bad input."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc

from services.common.errors import REQUEST_FAILED_KEY, STATUS_DETAILS_KEY
from services.gateway import message_counts
from services.gateway.errors import RpcError
from services.gateway.shards import Replica, ShardPool

log = logging.getLogger(__name__)

# A shard that dies, drains past its grace period or loses its engine ends streams with these.
SHARD_LOST_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                     grpc.StatusCode.INTERNAL)


class ShardLost(Exception):
    """The shard serving a stream went away before finishing it."""


def request_failed(exc: grpc.aio.AioRpcError) -> bool:
    """The shard failed this one request (see REQUEST_FAILED_KEY), not itself: no other replica is tried."""
    return exc.code() == grpc.StatusCode.INTERNAL and any(k == REQUEST_FAILED_KEY for k, _ in exc.trailing_metadata() or ())


async def open_shard_stream(shards: ShardPool, shard_request, deadline: float, first_message_timeout_s: float,
                            order: list[Replica] | None = None, tenant: str = ""):
    """Start the shard stream and read its first message. A replica that fails before that is
    marked down and the next one is tried: nothing was sent to the client yet."""
    errors = []
    replicas = deque(order or shards.ordered(tenant))
    per_request = None  # a replica whose shard refused a batch stream: called per request
    while replicas:
        replica = replicas.popleft()
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before a shard answered")
        call = start_call(replica, shard_request, deadline, batch=replica is not per_request)
        replica.begin(tenant)
        try:
            async with asyncio.timeout(min(timeout, first_message_timeout_s)):
                first = await call.read()
        except TimeoutError:  # a hung shard: the client's deadline is not spent on it
            replica.end(tenant)
            call.cancel()
            if time.monotonic() >= deadline:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before a shard answered") from None
            shards.mark_down(replica)
            errors.append(f"{replica.address}: no first token within {first_message_timeout_s:g}s")
            continue
        except grpc.aio.AioRpcError as exc:
            replica.end(tenant)
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and batched(call):
                per_request = replica  # an older shard without GenerateBatch: a call of its own
                replicas.appendleft(replica)
                continue
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise downstream_error(exc, "model shard") from None
            shards.mark_down(replica)
            errors.append(f"{replica.address}: {exc.details() or exc.code().name}")
            continue
        except BaseException:
            replica.end(tenant)
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            replica.end(tenant)
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"model shard {replica.address} closed the stream")
        shards.mark_up(replica)
        if not batched(call):
            message_counts.received("shard")
        return replica, call, first
    raise RpcError(grpc.StatusCode.UNAVAILABLE, f"no model shard is available ({'; '.join(errors)})")

async def next_shard_message(call):
    """The next message; ShardLost when the shard went away mid-stream (its work is resumable)."""
    try:
        msg = await call.read()
    except grpc.aio.AioRpcError as exc:
        if exc.code() in SHARD_LOST_CODES and not request_failed(exc):
            raise ShardLost(f"{exc.code().name}: {exc.details()}") from None
        raise downstream_error(exc, "model shard") from None
    if msg is grpc.aio.EOF:
        raise ShardLost("the stream ended before it finished")
    if not batched(call):
        message_counts.received("shard")
    return msg


def start_call(replica: Replica, shard_request, deadline: float, batch: bool = True):
    """The request on the replica's batch stream, or as a Generate call of its own: when batch is
    False, where the replica has no stream (--shard-streams call), or its shard is too old for one."""
    if batch and replica.batches is not None and not replica.batches.unsupported:
        return replica.batches.start(shard_request, deadline)
    message_counts.sent("shard")
    return replica.stub.Generate(shard_request, timeout=deadline - time.monotonic())


def batched(call) -> bool:
    """A BatchCall: its messages are counted per batch message by its stream."""
    return getattr(call, "batched", False)


def downstream_error(exc: grpc.aio.AioRpcError, service: str) -> RpcError:
    code = exc.code()
    if request_failed(exc):  # the shard is fine; this request cannot be computed
        return RpcError(grpc.StatusCode.INTERNAL, exc.details() or "the model shard failed this request")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        details = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if k == STATUS_DETAILS_KEY)
        return RpcError(code, exc.details() or code.name, details)
    log.warning("%s failed: %s %s", service, code.name, exc.details())
    return RpcError(grpc.StatusCode.UNAVAILABLE, f"the {service} is unavailable ({code.name})")
