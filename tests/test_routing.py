"""Prefix-affinity routing at the gateway."""

from __future__ import annotations

import threading

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, shard_pb2, shard_pb2_grpc
from services.common.block_hash import chain_block_hashes, index_key
from services.gateway.routing import PrefixAffinity
from services.gateway.shards import Replica

from .conftest import internal_channel, metric, shard_process, wait_for


def _replica(address: str, outstanding: int = 0, serving: bool = True) -> Replica:
    return Replica(address, channel=None, stub=None, outstanding=outstanding, serving=serving)


def test_prefix_held_wins_until_load_outweighs_it():
    affinity = PrefixAffinity(load_weight_blocks=4)
    hashes = PrefixAffinity.hashes(list(range(160)), 16)  # 10 blocks
    affinity.record("b", hashes[:6])
    a, b = _replica("a"), _replica("b", outstanding=1)
    assert [r.address for r in affinity.order([a, b], hashes)] == ["b", "a"]  # 6 held - 4 load > 0
    b.outstanding = 2
    assert [r.address for r in affinity.order([a, b], hashes)] == ["a", "b"]  # 6 - 8 < 0
    b.outstanding, b.serving = 0, False
    assert [r.address for r in affinity.order([a, b], hashes)] == ["a", "b"]  # never prefer a suspect


def test_only_a_leading_run_counts_and_memory_is_bounded():
    affinity = PrefixAffinity(capacity_blocks=4)
    hashes = PrefixAffinity.hashes(list(range(96)), 16)  # 6 blocks
    a = _replica("a")
    affinity.record("a", hashes[1:])  # not the first block: no prefix held
    assert affinity.held_blocks(a, hashes) == 0
    affinity.record("a", hashes)
    assert affinity.held_blocks(a, hashes) == 0  # the 4 newest kept; the leading blocks were evicted
    affinity.record("a", hashes[:3])
    assert affinity.held_blocks(a, hashes) == 3


def test_a_shards_own_index_overrides_the_gateways_memory():
    affinity = PrefixAffinity()
    hashes = PrefixAffinity.hashes(list(range(160)), 16)
    affinity.record("a", hashes)  # the gateway sent this prompt to a...
    a, b = _replica("a"), _replica("b")
    a.prefix_index = {index_key(h) for h in hashes[:2]}  # ...but a has evicted all but two blocks
    b.prefix_index = {index_key(h) for h in hashes[:7]}  # and b fetched seven from the cache
    assert affinity.held_blocks(a, hashes) == 2 and affinity.held_blocks(b, hashes) == 7
    assert [r.address for r in affinity.order([a, b], hashes)] == ["b", "a"]


@pytest.mark.e2e
def test_a_shared_prefix_follows_its_replica_even_when_another_is_idle(mesh, gateway):
    prefix = "You are a meticulous archivist. " + " ".join(f"Record {i}: item {i * 7} in box {i % 13}."
                                                            for i in range(40))
    question = lambda q: [common_pb2.ChatMessage(role="system", content=prefix),  # noqa: E731
                          common_pb2.ChatMessage(role="user", content=q)]
    greedy = common_pb2.SamplingParams(max_tokens=4)

    def fetched_from_cache() -> float:  # KV blocks the shards pulled from the cache service
        return sum(metric(spec.metrics_port, "llmmesh_kv_fetched_blocks_total") for spec in mesh.plan.shards)

    first = gateway.Generate(gateway_pb2.GenerateRequest(messages=question("Which box holds record 3?"),
                                                         sampling=greedy), timeout=60)
    assert first.usage.prompt_tokens > 400
    fetched = fetched_from_cache()
    # Keep one replica busy with a long stream; load alone would now send the next request to the other.
    busy = gateway.GenerateStream(gateway_pb2.GenerateRequest(
        prompt="Count slowly from one to five hundred:", sampling=common_pb2.SamplingParams(max_tokens=2000)),
        timeout=120)
    next(busy)
    try:
        second = gateway.Generate(gateway_pb2.GenerateRequest(messages=question("Which box holds record 9?"),
                                                              sampling=greedy), timeout=60)
    finally:
        busy.cancel()
    # Nearly the whole shared prefix came from the replica's own prefix cache, not the cache service.
    assert second.usage.cached >= first.usage.prompt_tokens - 48, (second.usage, first.usage)
    assert fetched_from_cache() == fetched


def test_a_shard_streams_its_prefix_index_through_evictions(tiny_model_dir, tmp_path):
    # float32: 1 MiB holds 128 blocks of the tiny model (the count the evictions below rely on).
    with shard_process(tiny_model_dir, tmp_path / "shard.log", "--kv-cache-mb", "1", "--threads", "1",
                       "--dtype", "float32", timeout=60) as (listen, _):
        channel = internal_channel(listen)
        stub = shard_pb2_grpc.ModelShardStub(channel)
        mirror: set[int] = set()
        removed: list[int] = []
        stream = stub.WatchPrefixIndex(shard_pb2.WatchPrefixIndexRequest(), timeout=120)
        first = next(stream)
        assert first.reset and list(first.added) == [] and first.block_size == 16

        def follow():
            try:
                for update in stream:
                    mirror.update(update.added)
                    mirror.difference_update(update.removed)
                    removed.extend(update.removed)
            except grpc.RpcError as exc:  # cancelled at the end of the test
                assert exc.code() == grpc.StatusCode.CANCELLED

        threading.Thread(target=follow, daemon=True).start()
        prompts = [[(7 * i + j) % 250 + 3 for j in range(64)] for i in range(40)]  # 4 full blocks each
        for prompt in prompts:
            list(stub.Generate(shard_pb2.ShardGenerateRequest(
                prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=1)), timeout=60))
        newest = {index_key(h) for h in chain_block_hashes(prompts[-1], 16)}

        def snapshot() -> set[int]:
            fresh = stub.WatchPrefixIndex(shard_pb2.WatchPrefixIndexRequest(), timeout=30)
            try:
                return set(next(fresh).added)
            finally:
                fresh.cancel()

        # The followed stream converges on what a fresh snapshot says, evictions included.
        assert wait_for(lambda: newest <= mirror and mirror == snapshot(), timeout=30)
        oldest = index_key(chain_block_hashes(prompts[0], 16)[0])
        assert oldest in removed and oldest not in mirror  # 160 blocks offered to a pool of 128
        stream.cancel()
