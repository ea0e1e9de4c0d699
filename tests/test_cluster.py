"""The mesh across hosts (network namespaces on a bridge, tests/cluster.py) under real network faults: a
host cut off mid-stream, with no reset and no error, as a partition is; delay and packet loss on every
link between the hosts. What the client sees is asserted: status, tokens, and a bound on the time it
took; and that nothing leaked: no request left on a shard or the gateway, no KV block held.

gateway, two tokenizer replicas, cache and two shard replicas each run on a host of their own, with their normal
command lines. The shards serve a tiny random model with the real vocabulary: they start at once, and
the tests are about the network, not the answers.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.channels import KEEPALIVE_BOUND_S

from .cluster import Cluster, cluster_unavailable, start_mesh
from .conftest import gateway_resumed, sample_value, scrape_metrics, streams_through, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(cluster_unavailable()), reason=str(cluster_unavailable()))]
MAX_TOKENS = 600
METRICS_PORT = 9100  # every host has ports of its own
SHARDS = ("shard0", "shard1")


@pytest.fixture(scope="module")
def cluster(real_model_dir, vocab_sized_tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    with Cluster(["gateway", "tokenizer", "tokenizer2", "cache", "shard0", "shard1"], logs) as c:
        shard = ["--kv-cache-mb", "64", "--threads", "1", "--metrics-port", str(METRICS_PORT)]
        gateway = start_mesh(c, real_model_dir, {"shard0": shard, "shard1": shard}, shard_model=vocab_sized_tiny_model,
                             gateway_args=["--no-response-cache", "--metrics-port", str(METRICS_PORT)],
                             env={"LLMMESH_LOG_FORMAT": "json"},
                             tokenizers=("tokenizer", "tokenizer2"))
        c.logs, c.address = logs, gateway
        c.stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gateway))
        yield c


@pytest.fixture
def healed(cluster):
    yield cluster
    for name in cluster.hosts:
        cluster.reconnect(name)
        cluster.unshape(name)


def _settled(cluster, shards=SHARDS) -> bool:
    """Nothing left in flight: no request running or waiting on a shard, no KV block held by one, no
    request open at the gateway."""
    for host in shards:
        shard = scrape_metrics(METRICS_PORT, cluster[host].ip)
        if any(sample_value(shard, name) for name in ("llmmesh_requests_running", "llmmesh_requests_waiting",
                                                       "llmmesh_kv_blocks_used_ratio")):
            return False
    gateway = scrape_metrics(METRICS_PORT, cluster["gateway"].ip)
    return not any(value for (name, _), value in gateway.items() if name == "llmmesh_tenant_gateway_requests_running")


def _assert_nothing_leaked(cluster, shards=SHARDS) -> None:
    assert wait_for(lambda: _settled(cluster, shards), timeout=15), "a request or its KV blocks outlived its stream"


async def _timed_streams(address: str, requests: list) -> list[tuple[list[int], str, float, float]]:
    """Every request's GenerateStream at once: (tokens, finish reason, TTFT, total seconds) each."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(request):
            start, first, tokens, finish = time.monotonic(), None, [], ""
            async for chunk in stub.GenerateStream(request, timeout=120):
                first = first or (time.monotonic() if chunk.token_ids else None)
                tokens.extend(chunk.token_ids)
                finish = chunk.finish_reason or finish
            return tokens, finish, first - start, time.monotonic() - start

        return await asyncio.gather(*(one(r) for r in requests))


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
    _assert_nothing_leaked(cluster, shards=("shard1",))  # the survivor; the cut-off one is unreachable


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
    _assert_nothing_leaked(cluster)


def test_the_cache_host_cut_off_leaves_answers_unaffected(healed):
    cluster = healed
    request = _greedy("The cache host goes away", 64)
    expected = _tokens(cluster.stub.GenerateStream(request, timeout=60))
    dropped = _over_shards(cluster, "llmmesh_kv_upload_dropped_blocks_total")
    cluster.isolate("cache")
    start = time.monotonic()
    new_prompt = "A long prompt that no shard has seen before, with blocks to share. " * 6
    for prompt in ("The cache host goes away", new_prompt):
        chunks = list(cluster.stub.GenerateStream(_greedy(prompt, 64), timeout=60))
        assert chunks[-1].finish_reason == "length"
        if prompt == "The cache host goes away":
            assert _tokens(chunks) == expected
    # Each request costs at most one KV fetch timeout (0.5 s) for the missing cache, not a stall.
    assert time.monotonic() - start < 10
    # The new prompt's blocks were offered for upload: dropped within the upload timeout (10 s), not
    # held, and not retried against the silent host.
    assert wait_for(lambda: _over_shards(cluster, "llmmesh_kv_upload_dropped_blocks_total") > dropped
                    and not _over_shards(cluster, "llmmesh_kv_upload_backlog_bytes"), timeout=15)
    _assert_nothing_leaked(cluster)


def _over_shards(cluster, name: str) -> float:
    """One sample of every shard's /metrics, summed."""
    return sum(sample_value(scrape_metrics(METRICS_PORT, cluster[h].ip), name) for h in SHARDS)


def test_five_ms_each_way_between_every_host_costs_round_trips_not_tokens(healed):
    cluster = healed
    request = _greedy("Latency between the hosts", 200)
    asyncio.run(_timed_streams(cluster.address, [request]))  # warm: the prompt's blocks are cached from here
    (tokens, _, ttft, took), = asyncio.run(_timed_streams(cluster.address, [request]))
    for host in cluster.hosts:
        cluster.shape(host, delay_ms=5)
    (slow_tokens, finish, slow_ttft, slow_took), = asyncio.run(_timed_streams(cluster.address, [request]))
    assert slow_tokens == tokens and finish == "length"
    # Before the first token: the tokenizer's round trip and the shard's, 10 ms each at least.
    assert slow_ttft >= ttft + 0.020 - 0.005, (ttft, slow_ttft)
    # After it, tokens stream: no round trip per token (200 of them would add 2 s).
    assert (slow_took - slow_ttft) - (took - ttft) < 1.0, (took - ttft, slow_took - slow_ttft)
    _assert_nothing_leaked(cluster)


def test_one_percent_loss_on_every_link_loses_no_stream_of_64(healed):
    cluster = healed
    requests = [_greedy(f"Lossy stream number {i}", 48) for i in range(64)]
    expected = [tokens for tokens, *_ in asyncio.run(_timed_streams(cluster.address, requests))]
    for host in cluster.hosts:
        cluster.shape(host, loss_pct=1)
    start = time.monotonic()
    seen = asyncio.run(_timed_streams(cluster.address, requests))
    assert [tokens for tokens, *_ in seen] == expected  # none lost, none cut short, none corrupted
    assert all(finish == "length" for _, finish, *_ in seen)
    assert time.monotonic() - start < 60
    _assert_nothing_leaked(cluster)
