"""GenerateBatch: many requests on one stream. Each request runs as its Generate call would (the same
messages, the same statuses, its own deadline and server span); what they make between two writes
goes out as one message, so a step of a 64-request batch costs one write instead of 64."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import propagate, trace

from llmmesh.v1 import shard_pb2
from services.common.telemetry import BATCHED_REQUEST_METHOD, start_rpc_span

log = logging.getLogger(__name__)


class CallError(Exception):
    """Ends one request with a gRPC status (a Generate call aborts with it; a batched request's item
    carries it)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple = ()):
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata)

    @classmethod
    def of(cls, status: grpc.Status) -> CallError:
        return cls(status.code, status.details, status.trailing_metadata)


def error_item(stream_id: int, err: CallError) -> shard_pb2.BatchItem:
    metadata = [shard_pb2.MetadataEntry(key=k, value=v if isinstance(v, bytes) else v.encode())
                for k, v in err.trailing_metadata]
    return shard_pb2.BatchItem(stream_id=stream_id, status_code=err.code.value[0], status_details=err.details,
                               trailing_metadata=metadata)


class BatchStream:
    def __init__(self, responses: Callable[[shard_pb2.ShardGenerateRequest], AsyncIterator],
                 draining: asyncio.Event | None):
        """responses(request): one request's messages, raising CallError (the servicer's). draining:
        once set, new requests are refused and the stream ends when its running ones have."""
        self._responses = responses
        self._draining = draining or asyncio.Event()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._running: dict[int, asyncio.Task] = {}
        self._reading = True

    async def run(self, requests: AsyncIterator[shard_pb2.BatchRequest]) -> AsyncIterator[shard_pb2.BatchResponse]:
        """The stream's replies: what is ready at each wake-up, in one message. Ends once the caller
        has closed its side (or the shard drains) and no request is running; leaving early (the
        caller went away, or broke the protocol: CallError) cancels every request."""
        reader = asyncio.create_task(self._read(requests))
        drain_watch = asyncio.create_task(self._wake_on_drain())
        try:
            # While the writer waits on a write, a request may put its last item and leave: the outbox
            # is drained before the stream ends.
            while self._reading or self._running or not self._outbox.empty():
                items = [await self._outbox.get()]
                while not self._outbox.empty():
                    items.append(self._outbox.get_nowait())
                items = [item for item in items if item is not None]
                if items:
                    yield shard_pb2.BatchResponse(items=items)
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # a broken protocol or message ends the stream, with its status
        finally:
            drain_watch.cancel()
            reader.cancel()
            for task in list(self._running.values()):
                task.cancel()

    async def _read(self, requests) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "start":
                    self._start(request.start)
                elif kind == "cancel" and (task := self._running.get(request.cancel)) is not None:
                    task.cancel()
        finally:
            self._reading = False
            self._outbox.put_nowait(None)  # wake the writer: it may be time to end

    async def _wake_on_drain(self) -> None:
        await self._draining.wait()
        self._reading = False
        self._outbox.put_nowait(None)

    def _start(self, start: shard_pb2.BatchStart) -> None:
        if start.stream_id in self._running:  # no answer under that id could say which request it is for
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"stream_id {start.stream_id} is in use on this "
                            "stream: the stream ends")
        if self._draining.is_set():
            self._outbox.put_nowait(error_item(start.stream_id, CallError(
                grpc.StatusCode.UNAVAILABLE, "the model shard is draining")))
        else:
            self._running[start.stream_id] = asyncio.create_task(self._run(start))

    async def _run(self, start: shard_pb2.BatchStart) -> None:
        stream_id, put = start.stream_id, self._outbox.put_nowait
        parent = propagate.extract(dict(start.trace_context))
        try:
            span = start_rpc_span(BATCHED_REQUEST_METHOD, server=True, context=parent)
            with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
                try:
                    # aclosing: a cancelled request leaves the engine now, not when its generator is collected.
                    async with asyncio.timeout(start.timeout_s or None), \
                            contextlib.aclosing(self._responses(start.request)) as messages:
                        async for msg in messages:
                            put(shard_pb2.BatchItem(stream_id=stream_id, response=msg))
                except TimeoutError:
                    raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                except CallError as err:
                    span.set_attribute("rpc.grpc.status_code", err.code.value[0])
                    raise
        except CallError as err:
            put(error_item(stream_id, err))
        except asyncio.CancelledError:
            pass  # the caller cancelled it (or left): it hears nothing more of this request
        except Exception as exc:  # this request fails; the others go on
            log.exception("batched request %d failed", stream_id)
            put(error_item(stream_id, CallError(grpc.StatusCode.UNKNOWN, f"the model shard failed: {exc}")))
        finally:
            self._running.pop(stream_id, None)
            put(None)  # the writer checks whether the stream is done
