"""Malformed and extreme requests at the gateway: no crash, no hang, every answer a deliberate status."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmmesh.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.e2e

# What a client may legitimately get back; UNKNOWN or INTERNAL would mean an unhandled path.
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED}

texts = st.one_of(st.text(max_size=200), st.sampled_from(["", " ", "\x00", "\ud7ff" * 3, "<|im_start|>", "é" * 500]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, -0.0]))
sampling = st.builds(
    common_pb2.SamplingParams,
    max_tokens=st.one_of(st.integers(1, 6), st.integers(4097, 2**32 - 1)),  # fast, or over the limit
    temperature=floats, top_p=floats, top_k=st.integers(0, 2**32 - 1),
    stop=st.lists(st.text(max_size=200), max_size=12), repetition_penalty=floats,
    seed=st.integers(0, 2**64 - 1), logprobs=st.booleans(),
)
messages = st.lists(st.builds(common_pb2.ChatMessage, role=st.one_of(st.sampled_from(["user", "system", "assistant"]),
                                                                     st.text(max_size=10)), content=texts), max_size=5)
requests = st.builds(gateway_pb2.GenerateRequest, prompt=texts, messages=messages, sampling=sampling,
                     request_id=st.text(max_size=200))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, stream=st.booleans())
def test_fuzzed_requests_get_a_deliberate_status(gateway, request, stream):
    try:
        if stream:
            chunks = list(gateway.GenerateStream(request, timeout=20))
            assert chunks and chunks[-1].finish_reason
        else:
            reply = gateway.Generate(request, timeout=20)
            assert reply.finish_reason
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED, (exc.code(), exc.details())
        assert exc.details() and "Traceback" not in exc.details()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300))
def test_garbage_bytes_do_not_hurt_the_gateway(mesh, payload):
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        raw = channel.unary_unary("/llmmesh.v1.Gateway/Generate", request_serializer=None, response_deserializer=None)
        try:
            raw(payload, timeout=20)
        except grpc.RpcError as exc:
            assert exc.code() in EXPECTED, (exc.code(), exc.details())
            assert "Traceback" not in exc.details() and "<class" not in exc.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
