"""Dependencies that fail fast and heal: a hung or dead tokenizer fails requests within its timeout,
takes the gateway's readiness with it, and is served again within about a second of its return; the
launcher restarts a service that dies."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.launcher import Mesh, plan_mesh, supervise, wait_healthy

from .conftest import free_ports, grpc_serving, wait_for

pytestmark = pytest.mark.e2e
TOKENIZER_TIMEOUT_S = 1.0
FIRST_TOKEN_TIMEOUT_S = 2.0


@pytest.fixture
def mesh(real_model_dir, vocab_sized_tiny_model, tmp_path):
    ports = free_ports(4)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, 0], gateway_metrics_port=0, shard_args=["--kv-cache-mb", "64"],
                     gateway_args=["--no-response-cache", "--tokenizer-timeout", str(TOKENIZER_TIMEOUT_S),
                                   "--shard-first-token-timeout", str(FIRST_TOKEN_TIMEOUT_S)])
    shard = plan.shards[0]
    shard.args[shard.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    with Mesh(plan, env={"LLMMESH_LOG_FORMAT": "json"}, log_dir=tmp_path).start(timeout=120) as m:
        yield m




def _ask(stub, timeout: float | None = None):
    request = gateway_pb2.GenerateRequest(prompt="Hello there", sampling=common_pb2.SamplingParams(max_tokens=8))
    return stub.Generate(request, timeout=timeout)


@contextlib.contextmanager
def _hung(process):
    """The process stopped (SIGSTOP), as a hung service is: its connections stay open, nothing answers."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def _fails_fast(stub, fragment: str, bound_s: float) -> None:
    """A request without a client deadline ends UNAVAILABLE, naming `fragment`, within bound_s."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _ask(stub)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and fragment in err.value.details()
    assert time.monotonic() - started < bound_s


def _serves_again_within(mesh, stub, bound_s: float) -> None:
    """From now, the gateway is ready and answers within bound_s."""
    back = time.monotonic()
    assert wait_for(lambda: grpc_serving(mesh.gateway_address), timeout=bound_s)
    assert _ask(stub, 30).usage.completion_tokens > 0
    assert time.monotonic() - back < bound_s


def test_a_hung_tokenizer_fails_requests_fast_and_is_reflected_in_readiness(mesh):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
    assert _ask(stub, 60).usage.completion_tokens > 0
    with _hung(mesh.processes["tokenizer"]):
        _fails_fast(stub, "tokenizer", TOKENIZER_TIMEOUT_S + 2)
        assert wait_for(lambda: not grpc_serving(mesh.gateway_address), timeout=5)
    _serves_again_within(mesh, stub, 5)


def test_a_dead_tokenizer_is_noticed_and_its_return_served_within_a_second_or_so(mesh):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
    assert _ask(stub, 60).usage.completion_tokens > 0
    mesh.kill("tokenizer")
    assert wait_for(lambda: not grpc_serving(mesh.gateway_address), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        _ask(stub, 30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    time.sleep(3)  # an outage long enough for gRPC's default reconnect backoff to have grown
    mesh.restart("tokenizer")  # returns once the tokenizer itself reports SERVING
    _serves_again_within(mesh, stub, 2.5)


def test_a_hung_shard_holds_a_request_no_longer_than_the_first_token_timeout(mesh):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
    assert _ask(stub, 60).usage.completion_tokens > 0
    with _hung(mesh.processes["shard-0"]):
        _fails_fast(stub, "first token", FIRST_TOKEN_TIMEOUT_S + 3)
    assert _ask(stub, 60).usage.completion_tokens > 0


def test_the_launcher_restarts_a_service_that_dies(mesh):
    stop = threading.Event()
    supervisor = threading.Thread(target=supervise, args=(mesh, stop), kwargs={"first_backoff_s": 0.1})
    supervisor.start()
    try:
        first = mesh.processes["shard-0"]
        mesh.kill("shard-0")
        assert wait_for(lambda: mesh.processes["shard-0"] is not first, timeout=30)
        wait_healthy(mesh.plan.shards[0].listen, 120, mesh.processes["shard-0"])
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
        assert wait_for(lambda: grpc_serving(mesh.gateway_address), timeout=10)
        assert _ask(stub, 60).usage.completion_tokens > 0
    finally:
        stop.set()
        supervisor.join(60)
    assert not supervisor.is_alive()
