"""One way to run a gRPC service: health, reflection, tracing, metrics, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.channels import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from services.common.internal_auth import RequireInternalToken
from services.common.tls import TlsFiles
from services.common.telemetry import server_interceptor

log = logging.getLogger(__name__)


_MALFORMED = object()
# A health service name that says only "this process runs" (for liveness probes): the others also
# say whether the service can serve now, which can depend on other services (readiness).
LIVENESS_SERVICE = "llmmesh.liveness"


class RejectMalformedRequests(grpc.aio.ServerInterceptor):
    """Bytes that do not decode as the method's request message get INVALID_ARGUMENT with a plain
    message, instead of grpc's UNKNOWN naming a Python exception."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        message = f"the request is not a valid message for {handler_call_details.method}"

        def safe_deserialize(data: bytes):
            try:
                return deserialize(data)
            except Exception:  # noqa: BLE001 - any decode failure is the client's malformed input
                return _MALFORMED

        if handler.request_streaming:
            return self._streaming(handler, safe_deserialize, message)
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary_unary(request, context):
                if request is _MALFORMED:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                return await inner_unary(request, context)

            return handler._replace(request_deserializer=safe_deserialize, unary_unary=unary_unary)
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            if request is _MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            async for item in _stream_from(inner_stream(request, context)):
                yield item

        return handler._replace(request_deserializer=safe_deserialize, unary_stream=unary_stream)


    @staticmethod
    def _streaming(handler, safe_deserialize, message: str):
        """Client-streaming methods: a malformed message ends the call with INVALID_ARGUMENT."""

        def checked(requests, context):
            async def messages():
                async for request in requests:
                    if request is _MALFORMED:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    yield request
            return messages()

        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream_stream(requests, context):
                async for item in _stream_from(inner_stream(checked(requests, context), context)):
                    yield item

            return handler._replace(request_deserializer=safe_deserialize, stream_stream=stream_stream)
        inner_unary = handler.stream_unary

        async def stream_unary(requests, context):
            return await inner_unary(checked(requests, context), context)

        return handler._replace(request_deserializer=safe_deserialize, stream_unary=stream_unary)


async def _stream_from(result):
    """Re-yield a streaming handler's output, whether it is an async generator or a coroutine
    that writes with context.write()."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result


class InFlightCalls(grpc.aio.ServerInterceptor):
    """Counts the service's own calls in progress, so a drain can end as soon as they are done instead
    of waiting out the grace period for never-ending streams. Not counted: health and reflection, and
    every `Watch*` method (by convention a subscription that lasts as long as its server)."""

    _UNCOUNTED = ("/grpc.health.", "/grpc.reflection.")

    @classmethod
    def counts(cls, method: str) -> bool:
        return not method.startswith(cls._UNCOUNTED) and not method.rsplit("/", 1)[-1].startswith("Watch")

    def __init__(self):
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.counts(handler_call_details.method):
            return handler
        kind = next(k for k in ("unary_unary", "stream_unary", "unary_stream", "stream_stream")
                    if getattr(handler, k) is not None)
        inner = getattr(handler, kind)
        if kind in ("unary_unary", "stream_unary"):
            async def counted(request, context):
                self._enter()
                try:
                    return await inner(request, context)
                finally:
                    self._leave()
        else:
            async def counted(request, context):
                self._enter()
                try:
                    async for item in _stream_from(inner(request, context)):
                        yield item
                finally:
                    self._leave()
        return handler._replace(**{kind: counted})


@dataclass
class ServeOptions:
    name: str
    listen: str  # host:port
    metrics_port: int = 0  # 0: no /metrics endpoint
    grace_s: float = 30.0
    tls: TlsFiles | None = None  # None: plaintext
    require_client_auth: bool = False  # with tls: callers must present a certificate (mutual TLS)
    max_receive_bytes: int = MAX_MESSAGE_BYTES  # the largest request message read
    interceptors: tuple = ()  # run first, before anything decodes a request (e.g. authentication)
    internal_token: str | None = None  # callers must send it (internal_auth.py); health checks stay open


def _callers_credential(options: ServeOptions) -> str:
    if options.internal_token:
        return "; callers need the internal token"
    return "; callers need a client certificate" if options.tls is not None and options.require_client_auth else ""


class ServiceRuntime:
    """What a running service may touch: its health status and its stop event.

    It serves while it is up (started, not draining) and what it depends on can serve; health
    (gRPC, and whatever reads `serving`) says so."""

    def __init__(self, health: HealthServicer, service_names: list[str]):
        self.health = health
        self.service_names = service_names
        self.stopping = asyncio.Event()
        self._up = False
        self._dependencies_ok = True

    @property
    def serving(self) -> bool:
        return self._up and self._dependencies_ok and not self.stopping.is_set()

    async def set_serving(self, serving: bool) -> None:
        self._up = serving
        await self._publish()

    async def set_dependencies_ok(self, ok: bool) -> None:
        """Whether the services this one needs can serve (e.g. a gateway's shards)."""
        self._dependencies_ok = ok
        await self._publish()

    async def _publish(self) -> None:
        if self.stopping.is_set():
            return  # the drain owns the status from here (enter_graceful_shutdown)
        serving = self.serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


async def serve(
    options: ServeOptions,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    on_start: Callable[[ServiceRuntime], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    on_drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then report NOT_SERVING, finish in-flight calls within the grace
    period, and return. `register` adds the servicers and returns their full service names;
    `on_drain` runs beside the gRPC drain (e.g. another front's own drain)."""
    in_flight = InFlightCalls()
    options_ = [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.max_receive_message_length"]
    check_token = [RequireInternalToken(options.internal_token)] if options.internal_token else []
    server = grpc.aio.server(interceptors=[*check_token, *options.interceptors, in_flight, RejectMalformedRequests(),
                                           server_interceptor()],
                             options=[*options_, ("grpc.max_receive_message_length", options.max_receive_bytes)])
    service_names = list(register(server))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    if options.tls is not None:
        port = server.add_secure_port(options.listen, options.tls.server_credentials(options.require_client_auth))
    else:
        port = server.add_insecure_port(options.listen)
    if port == 0:
        raise RuntimeError(f"{options.name}: cannot listen on {options.listen}")
    if options.metrics_port:
        host = options.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        start_http_server(options.metrics_port, addr=host)
    runtime = ServiceRuntime(health, service_names)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.stopping.set)
    await server.start()
    if on_start is not None:
        await on_start(runtime)
    await runtime.set_serving(True)
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s (metrics port %s%s)", options.name, options.listen, options.metrics_port or "off",
             _callers_credential(options))
    await runtime.stopping.wait()
    log.info("%s draining (grace %.0fs)", options.name, options.grace_s)
    runtime._up = False
    await health.enter_graceful_shutdown()
    loop = asyncio.get_running_loop()
    other_front = [loop.create_task(on_drain())] if on_drain else []
    stopping = loop.create_task(server.stop(options.grace_s))  # refuses new calls
    drained = await in_flight.wait_idle(options.grace_s)
    log.info("%s: %s", options.name, "in-flight calls finished" if drained else "grace period over, cancelling the rest")
    await server.stop(0)  # ends what is left: health watches, reflection streams
    await asyncio.gather(stopping, *other_front)
    if on_stop is not None:
        await on_stop()
    log.info("%s stopped", options.name)
