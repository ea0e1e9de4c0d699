"""The mesh across hosts (network namespaces on a bridge, tests/cluster.py) under real network faults: a
host cut off mid-stream, with no reset and no error, as a partition is. What the client sees is asserted:
status, tokens, and a bound on the time it took.

gateway, two tokenizer replicas, cache and two shard replicas each run on a host of their own, with their normal
command lines. The shards serve a tiny random model with the real vocabulary: they start at once, and
the tests are about the network, not the answers.
"""

from __future__ import annotations

import time

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.channels import KEEPALIVE_BOUND_S

from .cluster import Cluster, cluster_unavailable, start_mesh
from .conftest import gateway_resumed, streams_through

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(cluster_unavailable()), reason=str(cluster_unavailable()))]
MAX_TOKENS = 600


@pytest.fixture(scope="module")
def cluster(real_model_dir, vocab_sized_tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    with Cluster(["gateway", "tokenizer", "tokenizer2", "cache", "shard0", "shard1"], logs) as c:
        shard = ["--kv-cache-mb", "64", "--threads", "1"]
        gateway = start_mesh(c, real_model_dir, {"shard0": shard, "shard1": shard}, shard_model=vocab_sized_tiny_model,
                             gateway_args=["--no-response-cache"], env={"LLMMESH_LOG_FORMAT": "json"},
                             tokenizers=("tokenizer", "tokenizer2"))
        c.logs = logs
        c.stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gateway))
        yield c


@pytest.fixture
def healed(cluster):
    yield cluster
    for name in cluster.hosts:
        cluster.reconnect(name)


def _greedy(prompt: str, max_tokens: int = MAX_TOKENS) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens))


def _tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _serves(stub) -> bool:
    try:
        return bool(stub.Generate(_greedy("ping", 2), timeout=5).token_ids)
    except grpc.RpcError:
        return False


def test_a_shard_host_cut_off_mid_stream_resumes_on_the_other(healed):
    cluster = healed
    requests = [_greedy(f"Stream {i} across hosts") for i in range(4)]
    expected = [_tokens(cluster.stub.GenerateStream(r, timeout=120)) for r in requests]
    cut_at = []

    def cut():
        cut_at.append(time.monotonic())
        cluster.isolate("shard0")

    results = streams_through(cluster.stub, requests, cut)
    took = time.monotonic() - cut_at[0]
    assert [_tokens(r) for r in results] == expected  # token for token, as if nothing happened
    assert all(r[-1].finish_reason == "length" for r in results)
    # The silent partition is noticed by keepalive, within its bound (plus the rest of the answers,
    # about a second for this model).
    assert took < KEEPALIVE_BOUND_S + 8, took
    assert gateway_resumed(cluster.logs / "gateway-0.log"), "no stream was on the cut-off shard"


def test_a_tokenizer_replica_cut_off_stops_receiving_calls_within_a_probe(healed):
    cluster = healed
    cluster.isolate("tokenizer")
    cut, in_a_row = time.monotonic(), 0
    while in_a_row < 6:  # round robin over both replicas would fail every other request
        assert time.monotonic() - cut < 20, "calls still go to the cut-off tokenizer replica"
        start = time.monotonic()
        served = _serves(cluster.stub)
        in_a_row = in_a_row + 1 if served and time.monotonic() - start < 2 else 0


def test_every_tokenizer_host_cut_off_fails_fast_then_heals(healed):
    cluster = healed
    cluster.isolate("tokenizer")
    cluster.isolate("tokenizer2")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        cluster.stub.Generate(_greedy("Hello", 4), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "tokenizer" in err.value.details()
    assert time.monotonic() - start < 8  # the gateway's --tokenizer-timeout (5 s), not the deadline
    cluster.reconnect("tokenizer")
    cluster.reconnect("tokenizer2")
    deadline = time.monotonic() + 30
    while not _serves(cluster.stub):
        assert time.monotonic() < deadline, "not served again within 30 s of the tokenizers' return"


def test_the_cache_host_cut_off_leaves_answers_unaffected(healed):
    cluster = healed
    request = _greedy("The cache host goes away", 64)
    expected = _tokens(cluster.stub.GenerateStream(request, timeout=60))
    cluster.isolate("cache")
    start = time.monotonic()
    for prompt in ("The cache host goes away", "A prompt no shard has seen"):
        chunks = list(cluster.stub.GenerateStream(_greedy(prompt, 64), timeout=60))
        assert chunks[-1].finish_reason == "length"
        if prompt == "The cache host goes away":
            assert _tokens(chunks) == expected
    # Each request costs at most one KV fetch timeout (0.5 s) for the missing cache, not a stall.
    assert time.monotonic() - start < 10
