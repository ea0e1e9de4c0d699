"""Requests to one shard replica on one GenerateBatch stream: each message back carries every
request's tokens of one engine step, so the messages per token fall as the batch grows. Each request
is a BatchCall, read and cancelled as its own Generate call would be (shard_calls.py reads both),
with the same statuses, its own deadline and its own client span."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time

import grpc
from opentelemetry import propagate, trace

from llmmesh.v1 import shard_pb2, shard_pb2_grpc
from services.common.telemetry import BATCHED_REQUEST_METHOD, start_rpc_span
from services.gateway import message_counts


def call_error(code: grpc.StatusCode, details: str, trailing: tuple = ()) -> grpc.aio.AioRpcError:
    """The error a Generate call would have raised."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def item_error(item: shard_pb2.BatchItem) -> grpc.aio.AioRpcError:
    code = next((c for c in grpc.StatusCode if c.value[0] == item.status_code), grpc.StatusCode.UNKNOWN)
    trailing = tuple((m.key, m.value if m.key.endswith("-bin") else m.value.decode()) for m in item.trailing_metadata)
    return call_error(code, item.status_details, trailing)


class BatchCall:
    """One request on a batch stream. read() gives its messages, then grpc.aio.EOF after the one with
    a finish reason, or raises the AioRpcError its Generate call would have raised."""

    batched = True  # its messages are counted per batch message, by the stream (message_counts)

    def __init__(self, connection: _Connection, stream_id: int, deadline: float | None):
        self._connection, self.stream_id = connection, stream_id
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._last = None  # EOF or the error it ended with: every read after the messages gives it
        self.span = start_rpc_span(BATCHED_REQUEST_METHOD, server=False)
        self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(max(deadline - time.monotonic(), 0), self._expire)

    async def read(self):
        item = await self._inbox.get()
        if item is self._last:
            self._inbox.put_nowait(item)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    def cancel(self) -> bool:
        if self._last is not None:
            return False
        self._connection.send(shard_pb2.BatchRequest(cancel=self.stream_id))
        self._end(call_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
        return True

    def deliver(self, item: shard_pb2.BatchItem) -> None:
        if self._last is not None:
            return
        if item.status_code:
            self._end(item_error(item))
            return
        self._inbox.put_nowait(item.response)
        if item.response.finish_reason:
            self._end(grpc.aio.EOF)

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        if self._last is None:
            self._end(error)

    def _expire(self) -> None:
        if self._last is None:
            self._connection.send(shard_pb2.BatchRequest(cancel=self.stream_id))
            self._end(call_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _end(self, last) -> None:
        self._last = last
        self._connection.forget(self.stream_id)
        if self._timer is not None:
            self._timer.cancel()
        self._inbox.put_nowait(last)
        if isinstance(last, grpc.aio.AioRpcError):
            self.span.set_attribute("rpc.grpc.status_code", last.code().value[0])
            if last.code() != grpc.StatusCode.CANCELLED:
                self.span.set_status(trace.StatusCode.ERROR, last.details())
        self.span.end()


class _Connection:
    """One GenerateBatch call and the requests started on it."""

    def __init__(self, stub: shard_pb2_grpc.ModelShardStub):
        self.calls: dict[int, BatchCall] = {}
        self.open = True  # takes new requests
        self._half_closed = False
        self._outbox: asyncio.Queue = asyncio.Queue()
        self.call = stub.GenerateBatch(self._requests())
        self.reader: asyncio.Task | None = None  # held here: the loop keeps only a weak reference

    def send(self, request: shard_pb2.BatchRequest) -> None:
        if not self._half_closed:
            self._outbox.put_nowait(request)

    def forget(self, stream_id: int) -> None:
        """A call ended; a finishing connection half-closes once none is left."""
        self.calls.pop(stream_id, None)
        if not self.open and not self.calls:
            self._half_close()

    def close(self, error: grpc.aio.AioRpcError) -> None:
        self.open = False
        self._half_close()
        for call in list(self.calls.values()):
            call.fail(error)

    def finish(self) -> None:
        """No new requests; once those started have ended (their cancels can still be sent), send
        nothing more: the shard then ends the stream."""
        self.open = False
        if not self.calls:
            self._half_close()

    def _half_close(self) -> None:
        if not self._half_closed:
            self._half_closed = True
            self._outbox.put_nowait(None)

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request


class ShardBatchStream:
    """The gateway's GenerateBatch stream to one replica, opened on first use and again after it
    ends. When it breaks, every request on it fails with UNAVAILABLE (a lost shard: resumable)."""

    def __init__(self, stub: shard_pb2_grpc.ModelShardStub, address: str, recheck_s: float = 60.0):
        """recheck_s: how long a shard that answered UNIMPLEMENTED (an older version, without
        GenerateBatch) is called per request before its stream is tried again: the shard at that
        address may have been upgraded meanwhile."""
        self._stub, self.address, self.recheck_s = stub, address, recheck_s
        self._ids = itertools.count(1)
        self._connection: _Connection | None = None
        self._unsupported_at: float | None = None

    @property
    def unsupported(self) -> bool:
        """The shard had no GenerateBatch less than recheck_s ago: use Generate."""
        return self._unsupported_at is not None and time.monotonic() - self._unsupported_at < self.recheck_s

    def finish(self) -> None:
        """The replica leaves the pool: its stream ends once its requests have (so its channel can
        close without waiting out a grace period); a later request would open a new one."""
        if self._connection is not None and self._connection.open:
            self._connection.finish()

    def start(self, request: shard_pb2.ShardGenerateRequest, deadline: float | None) -> BatchCall:
        """Send the request; its BatchCall reads what comes back. Its client span starts now, in the
        caller's trace context, and the shard's server span is its child."""
        if self._connection is None or not self._connection.open:
            self._connection = connection = _Connection(self._stub)
            # Not in this request's trace context: the stream outlives the request that opened it.
            connection.reader = asyncio.get_running_loop().create_task(self._read(connection),
                                                                       context=contextvars.Context())
        connection = self._connection
        call = BatchCall(connection, next(self._ids), deadline)
        connection.calls[call.stream_id] = call
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(call.span))
        timeout = max(deadline - time.monotonic(), 0.001) if deadline is not None else 0
        connection.send(shard_pb2.BatchRequest(start=shard_pb2.BatchStart(
            stream_id=call.stream_id, request=request, timeout_s=timeout, trace_context=carrier)))
        message_counts.sent("shard")
        return call

    async def _read(self, connection: _Connection) -> None:
        error = call_error(grpc.StatusCode.UNAVAILABLE, f"model shard {self.address} ended its batch stream")
        try:
            while (reply := await connection.call.read()) is not grpc.aio.EOF:
                message_counts.received("shard")
                for item in reply.items:
                    if (target := connection.calls.get(item.stream_id)) is not None:
                        target.deliver(item)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported_at = time.monotonic()
                error = exc
            else:
                error = call_error(grpc.StatusCode.UNAVAILABLE,
                                   f"model shard {self.address}: {exc.details() or exc.code().name}")
        except asyncio.CancelledError:
            connection.call.cancel()
            raise
        finally:
            connection.close(error)
