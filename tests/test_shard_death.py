"""A sampling value cannot kill a shard, and an engine that does die takes its process with it:
the shard exits non-zero (so a supervisor restarts it) and the gateway stops reporting SERVING."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.launcher import Mesh, plan_mesh

from .conftest import free_ports
from .faulty_shard import POISON_MAX_TOKENS

pytestmark = pytest.mark.e2e
EXTREMES = [dict(temperature=1e-45), dict(temperature=1e-40), dict(temperature=1.0, repetition_penalty=1e-45),
            dict(temperature=100.0, top_k=2**32 - 1, top_p=1e-45), dict(temperature=0.5, min_p=1.0),
            dict(temperature=1e-45, repetition_penalty=10.0, seed=2**64 - 1)]
HTTP_EXTREMES = [dict(temperature=1e-45), dict(temperature=1e-40, seed=2**64 - 1), dict(repetition_penalty=1e-45),
                 dict(temperature=2, top_p=1e-45), dict(min_p=1.0), dict(temperature=0, repetition_penalty=10)]


@pytest.fixture
def mesh(real_model_dir, vocab_sized_tiny_model, tmp_path):
    ports = free_ports(5)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, 0], gateway_metrics_port=0, shard_args=["--kv-cache-mb", "64"],
                     gateway_args=["--no-response-cache", "--http-listen", f"127.0.0.1:{ports[4]}"])
    shard = plan.shards[0]
    shard.module = "tests.faulty_shard"
    shard.args[shard.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    with Mesh(plan, env={"LLMMESH_LOG_FORMAT": "json"}, log_dir=tmp_path).start(timeout=120) as m:
        m.http = f"http://127.0.0.1:{ports[4]}"
        yield m


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_extreme_sampling_values_are_served_and_an_engine_death_ends_the_shard(mesh):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
    for extreme in EXTREMES:
        reply = stub.Generate(gateway_pb2.GenerateRequest(
            prompt="Tell me about rivers", sampling=common_pb2.SamplingParams(max_tokens=8, **extreme)), timeout=60)
        assert reply.usage.completion_tokens > 0 and reply.finish_reason in ("length", "stop"), extreme
    for extreme in HTTP_EXTREMES:
        status, body = _post(f"{mesh.http}/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": "Rivers",
                                                              "max_tokens": 8, **extreme})
        assert status == 200 and body["usage"]["completion_tokens"] > 0, (extreme, body)
    assert _health(f"{mesh.http}/health") == 200

    gateway_health = health_pb2_grpc.HealthStub(grpc.insecure_channel(mesh.gateway_address))
    watch = gateway_health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(gateway_pb2.GenerateRequest(
            prompt="poison", sampling=common_pb2.SamplingParams(max_tokens=POISON_MAX_TOKENS)), timeout=60)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert mesh.processes["shard-0"].wait(60) == 1  # the process ends, non-zero: a supervisor restarts it
    assert next(s for s in (r.status for r in watch) if s != health_pb2.HealthCheckResponse.SERVING) \
        == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(f"{mesh.http}/health") == 503
    # The gateway itself stays up (its liveness holds) and says why it cannot serve.
    live = gateway_health.Check(health_pb2.HealthCheckRequest(service="llmmesh.liveness"), timeout=10)
    assert live.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(gateway_pb2.GenerateRequest(prompt="anyone there?"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
