"""What a hostile or careless client can send: colliding request ids, another tenant's prompt, no key,
oversized or malformed bodies, forged log lines, garbage on internal streams, abandoned requests.

The shard runs a tiny random Llama with the real tokenizer's vocabulary: these tests are about the
mesh's plumbing, not the model's answers."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.logs import TextFormatter
from services.gateway.auth import hash_key
from services.launcher import Mesh, plan_mesh

from .conftest import free_ports, metric, wait_for

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
KEYS = {"tenant-a": "sk-a-0123456789", "tenant-b": "sk-b-0123456789"}
MAX_PROMPT_CHARS = 20_000
MAX_REQUEST_BYTES = 100_000


@pytest.fixture(scope="module")
def mesh(real_model_dir, vocab_sized_tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    keys = root / "keys"
    keys.write_text("".join(f"{tenant} {hash_key(key)}\n" for tenant, key in KEYS.items()))
    ports = free_ports(6)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, ports[4]], gateway_metrics_port=0,
                     # float32: the random tiny model's answers to different prompts differ (in bfloat16
                     # many collapse onto one repeated token, and the collision test needs them apart).
                     shard_args=["--kv-cache-mb", "64", "--dtype", "float32"],
                     gateway_args=["--http-listen", f"127.0.0.1:{ports[5]}", "--api-keys-file", str(keys),
                                   "--max-prompt-chars", str(MAX_PROMPT_CHARS),
                                   "--max-request-bytes", str(MAX_REQUEST_BYTES)])
    shard = plan.shards[0]
    shard.args[shard.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    with Mesh(plan, env={"LLMMESH_LOG_FORMAT": "json"}, log_dir=root).start(timeout=120) as m:
        m.http = f"http://127.0.0.1:{ports[5]}"
        m.http_port = ports[5]
        m.shard_metrics = ports[4]
        m.log_dir = root
        yield m


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def _auth(tenant: str = "tenant-a") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tenant]}")]


def _http(mesh, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
          tenant: str | None = "tenant-a") -> tuple[int, dict]:
    headers = {"content-type": "application/json", **(headers or {})}
    if tenant:
        headers["authorization"] = f"Bearer {KEYS[tenant]}"
    request = urllib.request.Request(mesh.http + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_colliding_request_ids_never_mix_streams(stub):
    prompts = [f"Prompt number {i} is about a different thing" for i in range(4)]
    sampling = common_pb2.SamplingParams(max_tokens=500)  # long enough for the four to overlap
    alone = [_tokens(stub.GenerateStream(gateway_pb2.GenerateRequest(prompt=p, sampling=sampling), timeout=60,
                                         metadata=_auth())) for p in prompts]
    assert len({tuple(t) for t in alone}) == 4 and all(len(t) == 500 for t in alone), [len(t) for t in alone]
    start = threading.Barrier(4)

    def run(prompt):
        start.wait(timeout=30)
        # One token fewer than alone: not answered from the response cache.
        request = gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=499),
                                              request_id="same-id")
        chunks = list(stub.GenerateStream(request, timeout=60, metadata=_auth()))
        assert all(c.request_id == "same-id" for c in chunks)  # the label comes back as sent
        return _tokens(chunks)

    with ThreadPoolExecutor(4) as pool:
        together = [f.result(timeout=90) for f in [pool.submit(run, p) for p in prompts]]
    assert together == [tokens[:499] for tokens in alone]


def test_the_response_cache_is_per_tenant(stub):
    request = gateway_pb2.GenerateRequest(prompt="A question only tenant A asked", sampling=common_pb2.SamplingParams(
        max_tokens=12))
    first = stub.Generate(request, timeout=60, metadata=_auth("tenant-a"))
    again = stub.Generate(request, timeout=60, metadata=_auth("tenant-a"))
    other = stub.Generate(request, timeout=60, metadata=_auth("tenant-b"))
    assert not first.usage.from_response_cache and again.usage.from_response_cache
    assert not other.usage.from_response_cache  # B learns nothing of A's question
    assert other.token_ids == first.token_ids


def test_nothing_is_answered_or_parsed_before_authentication(mesh, stub):
    big = gateway_pb2.GenerateRequest(prompt="x" * (MAX_PROMPT_CHARS * 2))  # invalid, but the key comes first
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(big, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    cases = [("POST", "/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": []}).encode()),
             ("POST", "/v1/completions", b"{not json"), ("GET", "/v1/models/gpt-9", None), ("GET", "/v1/nowhere", None)]
    for method, path, body in cases:
        status, reply = _http(mesh, method, path, body, tenant=None)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key", (path, reply)
        assert "gpt-9" not in json.dumps(reply) and MODEL not in json.dumps(reply)


def test_requests_larger_than_a_valid_one_can_be_are_refused_unread(mesh, stub):
    huge = gateway_pb2.GenerateRequest(prompt="y" * (MAX_REQUEST_BYTES + 10))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(huge, timeout=30, metadata=_auth())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    body = json.dumps({"model": MODEL, "prompt": "z" * (MAX_REQUEST_BYTES + 10)}).encode()
    status, reply = _http(mesh, "POST", "/v1/completions", body)
    assert status == 413 and reply["error"]["code"] == "request_too_large"


SURROGATE = "\ud800"
BAD_BODIES = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": f"hi {SURROGATE}"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": f"user{SURROGATE}", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": f"m{SURROGATE}", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [SURROGATE]}),
    ("/v1/completions", {"model": MODEL, "prompt": SURROGATE}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2**32}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 2**32}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": 2**32}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}),
]


@pytest.mark.parametrize("path,body", BAD_BODIES)
def test_malformed_http_bodies_get_an_openai_shaped_400(mesh, path, body):
    status, reply = _http(mesh, "POST", path, json.dumps(body).encode())  # json.dumps escapes the surrogate
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1", "0", "soon"])
def test_bad_timeout_headers_are_400(mesh, value):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    status, reply = _http(mesh, "POST", "/v1/completions", body, headers={"x-request-timeout": value})
    assert status == 400 and reply["error"]["param"] == "x-request-timeout"


def test_every_http_error_is_openai_shaped(mesh):
    for method, path, body, want in [("GET", "/v1/nowhere", None, 404), ("GET", "/v1/completions", None, 405),
                                     ("POST", "/v1/completions", b'{"model": "x", "prompt": 9', 400)]:
        status, reply = _http(mesh, method, path, body)
        assert status == want and set(reply) == {"error"}, reply
    assert "not valid JSON" in reply["error"]["message"] and reply["error"]["param"] is None


def test_a_request_id_cannot_forge_a_log_line(stub):
    request = gateway_pb2.GenerateRequest(prompt="hi", request_id='x\n{"event": "request", "tenant": "root"}')
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=30, metadata=_auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    record = logging.LogRecord("llmmesh.audit", logging.INFO, __file__, 1, "request %s", ("a\nFORGED\r\nb",), None)
    assert "\n" not in TextFormatter("%(message)s").format(record)


@pytest.mark.parametrize("service,method", [("tokenizer", "/llmmesh.v1.Tokenizer/DetokenizeStream"),
                                            ("cache", "/llmmesh.v1.Cache/PutKvBlocks")])
def test_garbage_on_internal_streams_is_invalid_argument(mesh, service, method):
    address = getattr(mesh.plan, service).listen
    with mesh.channel(address) as channel:
        call = channel.stream_stream(method) if "Detokenize" in method else channel.stream_unary(method)
        with pytest.raises(grpc.RpcError) as err:
            result = call(iter([b"\xff\xff\xff\xff"]), timeout=10)
            list(result) if "Detokenize" in method else result
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_abandoned_unstreamed_http_request_stops_on_the_shard(mesh):
    tokens_before = metric(mesh.shard_metrics, "llmmesh_step_tokens_sum")
    body = json.dumps({"model": MODEL, "prompt": "Tell a very long story", "max_tokens": 3000}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=30)
    connection.request("POST", "/v1/completions", body, {"content-type": "application/json",
                                                          "authorization": f"Bearer {KEYS['tenant-a']}"})
    assert wait_for(lambda: metric(mesh.shard_metrics, "llmmesh_requests_running") >= 1, timeout=30)
    connection.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-answer
    connection.close()
    assert wait_for(lambda: metric(mesh.shard_metrics, "llmmesh_requests_running") == 0, timeout=10)
    computed = metric(mesh.shard_metrics, "llmmesh_step_tokens_sum") - tokens_before
    assert 0 < computed < 3000  # stopped, not run to the end
