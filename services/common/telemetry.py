"""OpenTelemetry set-up shared by every service: one tracer provider, W3C context on every gRPC hop.

Exporters follow the standard OTEL_* variables (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; OTEL_EXPORTER_OTLP_PROTOCOL picks grpc or http/protobuf;
OTEL_TRACES_SAMPLER picks sampling). LLMMESH_TRACE_DIR adds a JSON-lines file per process, which
tests and `make trace` read.
"""

from __future__ import annotations

import os
from pathlib import Path

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

VERSION = "0.1.0"

# Health probes and reflection would drown real traffic in spans. A batch stream lives as long as
# its connection: each request on it is traced as its own call instead (start_rpc_span).
_UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _traced(details) -> bool:
    """The instrumentation's filter, on the method name alone: its own filters test the details'
    type against typing protocols on every call, a few percent of a busy gateway's time."""
    method = details.method
    if isinstance(method, bytes):  # grpc.aio's client details carry bytes (grpc/grpc#31092)
        method = method.decode()
    return not method.startswith(_UNTRACED_PREFIXES) and not method.endswith("/GenerateBatch")


def setup_tracing(service_name: str, instance_id: str) -> TracerProvider:
    resource = Resource.create(
        {
            "service.name": f"llmmesh-{service_name}",
            "service.namespace": "llmmesh",
            "service.version": VERSION,
            "service.instance.id": instance_id,
        }
    )
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace_dir = os.environ.get("LLMMESH_TRACE_DIR")
    if trace_dir:
        path = Path(trace_dir) / f"{service_name}-{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def server_interceptor():
    return aio_server_interceptor(filter_=_traced)


def client_interceptors():
    return aio_client_interceptors(filter_=_traced)


# A request on a GenerateBatch stream is traced as this call, on both sides of it.
BATCHED_REQUEST_METHOD = "/llmmesh.v1.ModelShard/Generate"


def start_rpc_span(method: str, server: bool, context=None) -> trace.Span:
    """A span for one call carried inside another stream (a batched request), named and described as
    the gRPC instrumentation describes a call of its own (method: "/package.Service/Method")."""
    service, name = method.lstrip("/").split("/", 1)
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "rpc.grpc.status_code": 0,
                  "llmmesh.batched": True}
    kind = trace.SpanKind.SERVER if server else trace.SpanKind.CLIENT
    return tracer("llmmesh").start_span(method, context=context, kind=kind, attributes=attributes)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name, VERSION)


def trace_exemplar() -> dict[str, str] | None:
    """The current trace's id as a histogram exemplar: a slow bucket links to a request's trace
    (exemplars show only in the OpenMetrics exposition, which Prometheus asks for)."""
    ctx = trace.get_current_span().get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x")} if ctx.is_valid else None


def record_span(name: str, start_ns: int, end_ns: int, attributes: dict | None = None) -> None:
    """A child span of the current one for a stretch timed elsewhere (e.g. on the engine thread)."""
    span = tracer("llmmesh").start_span(name, start_time=start_ns, attributes=attributes or {})
    span.end(end_time=max(end_ns, start_ns))
