"""Drain and failover with real processes: SIGTERM finishes running streams; a shard killed
mid-stream is invisible to clients (their streams resume on the other replica, token for token).

The shards run a tiny random Llama with the real tokenizer's vocabulary: fast, deterministic, and
all these tests need (the tokens must match an undisturbed run, not make sense)."""

from __future__ import annotations

import json
import re
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.launcher import Mesh, plan_mesh

from .conftest import free_ports, gateway_resumed, streams_through

pytestmark = pytest.mark.e2e
MAX_TOKENS = 600


def _mesh(real_model_dir, tiny, root, shards: int) -> Mesh:
    ports = free_ports(2 + shards + 1)
    plan = plan_mesh(str(real_model_dir), shards=shards, gateway_port=ports[0], ports=ports[1:],
                     metrics_ports=[0] * (2 + shards), gateway_metrics_port=0,
                     shard_args=["--kv-cache-mb", "64", "--grace", "60"], gateway_args=["--no-response-cache"])
    for spec in plan.shards:  # the shards serve the tiny model; the tokenizer stays the real one
        spec.args[spec.args.index("--model") + 1] = str(tiny)
    return Mesh(plan, env={"LLMMESH_LOG_FORMAT": "json"}, log_dir=root).start(timeout=120)


def _requests() -> list[gateway_pb2.GenerateRequest]:
    greedy = [gateway_pb2.GenerateRequest(prompt=f"Stream number {i} about rivers",
                                          sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS))
              for i in range(4)]
    seeded = gateway_pb2.GenerateRequest(prompt="A seeded story", sampling=common_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.8, top_k=40, seed=1234))
    choices = gateway_pb2.GenerateRequest(prompt="Two seeded stories", sampling=common_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.8, seed=99, n=2))  # each choice resumes on its own
    constrained = gateway_pb2.GenerateRequest(prompt="Some words", sampling=common_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.8, seed=7,
        structured=common_pb2.StructuredOutput(regex="[a-z ]+")))  # resumed: its matcher is fed what was delivered
    lookup = common_pb2.Tool(name="lookup", parameters=json.dumps({
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 12}}, "required": ["q"],
        "additionalProperties": False}))
    calls = gateway_pb2.GenerateRequest(  # resumed: the call parser keeps its place, the grammar its state
        messages=[common_pb2.ChatMessage(role="user", content="Look things up")], tools=[lookup],
        tool_choice=common_pb2.ToolChoice(required=True), sampling=common_pb2.SamplingParams(
            max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.8, seed=3))
    return [*greedy, seeded, choices, calls, constrained]


def _tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _choices(chunks) -> dict[int, tuple[list[int], str, str]]:
    """Per choice index: its tokens, its text and its finish reason."""
    out: dict[int, tuple[list[int], str, str]] = {}
    for c in chunks:
        tokens, text, reason = out.get(c.index, ([], "", ""))
        out[c.index] = (tokens + list(c.token_ids), text + c.text, c.finish_reason or reason)
    return out


def _watch_health(address: str, timeout: float = 60):
    """A health Watch stream, opened now: a draining server refuses new connections, so watch first."""
    channel = grpc.insecure_channel(address)
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=timeout)


def _wait_until_not_serving(watch) -> None:
    for reply in watch:
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return


def test_sigterm_drains_a_shard_without_cutting_its_stream(real_model_dir, vocab_sized_tiny_model, tmp_path):
    with _mesh(real_model_dir, vocab_sized_tiny_model, tmp_path, shards=1) as mesh:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
        request = _requests()[0]
        expected = _tokens(stub.GenerateStream(request, timeout=120))
        assert len(expected) == MAX_TOKENS

        watch = _watch_health(mesh.plan.shards[0].listen)
        stream = stub.GenerateStream(request, timeout=120)
        chunks = [next(stream)]
        mesh.processes["shard-0"].send_signal(signal.SIGTERM)
        _wait_until_not_serving(watch)
        # Draining: new work is refused at once...
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(gateway_pb2.GenerateRequest(prompt="new work"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...while the running stream finishes, whole.
        chunks.extend(stream)
        assert chunks[-1].finish_reason == "length" and _tokens(chunks) == expected
        assert mesh.processes["shard-0"].wait(90) == 0
        # It stopped once its calls were done (the gateway's batch stream among them), not at the end of its grace.
        assert "in-flight calls finished" in (tmp_path / "shard-0.log").read_text()


def test_killing_a_shard_mid_stream_is_invisible_to_clients(real_model_dir, vocab_sized_tiny_model, tmp_path):
    with _mesh(real_model_dir, vocab_sized_tiny_model, tmp_path, shards=2) as mesh:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(mesh.gateway_address))
        requests = _requests()
        expected = [list(stub.GenerateStream(r, timeout=120)) for r in requests]
        assert all(len(tokens) == MAX_TOKENS for e in expected for tokens, _, _ in _choices(e).values())

        # Every stream is running, spread over both replicas, when shard-0 dies.
        results = streams_through(stub, requests, lambda: mesh.kill("shard-0"))

        for got, want in zip(results, expected):
            assert _choices(got) == _choices(want)
            assert got[-1].usage.completion_tokens == want[-1].usage.completion_tokens
        assert re.fullmatch("[a-z ]+", _choices(results[-1])[0][1])
        calls = [[(call.name, call.arguments) for c in chunks for call in c.tool_calls] for chunks in
                 (results[-2], expected[-2])]
        assert calls[0] == calls[1] and len(calls[0]) > 1
        assert all(set(json.loads(arguments)) == {"q"} for _, arguments in calls[0])
        assert gateway_resumed(tmp_path / "gateway.log"), "no stream was on the killed shard"
