"""Which gRPC calls get spans of their own: not health probes, reflection, or a batch stream (whose
requests are traced one by one); every other call, on either side."""

from __future__ import annotations

import grpc

from services.common.telemetry import _traced


class _ServerDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str):
        self.method, self.invocation_metadata = method, ()


def _client(method: str) -> grpc.aio.ClientCallDetails:  # grpc.aio hands the method over as bytes
    return grpc.aio.ClientCallDetails(method.encode(), None, None, None, None)


def test_probes_reflection_and_batch_streams_are_not_traced():
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                   "/llmmesh.v1.ModelShard/GenerateBatch"):
        assert not _traced(_ServerDetails(method)) and not _traced(_client(method)), method
    for method in ("/llmmesh.v1.ModelShard/Generate", "/llmmesh.v1.Gateway/GenerateStream",
                   "/llmmesh.v1.Tokenizer/Encode", "/llmmesh.v1.Cache/GetResponse"):
        assert _traced(_ServerDetails(method)) and _traced(_client(method)), method
