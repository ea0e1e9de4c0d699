"""A real OTLP/gRPC trace receiver for tests: the services export to it as to any collector."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self._lock = threading.Condition()
        self._spans: list[dict] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def start(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1)

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append({
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex() or None, "name": span.name,
                        "service": resource.get("service.name"), "events": [e.name for e in span.events],
                        "attributes": {a.key: a.value for a in span.attributes},
                    })
        with self._lock:
            self._spans.extend(received)
            self._lock.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout: float) -> list[dict]:
        """Block until predicate(spans so far) is true (woken by each export) or timeout; the spans."""
        with self._lock:
            self._lock.wait_for(lambda: predicate(self._spans), timeout=timeout)
            return list(self._spans)
