"""Prefix-affinity routing at the gateway."""

from __future__ import annotations

import pytest

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.routing import PrefixAffinity
from services.gateway.shards import Replica


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
    affinity.record("a", hashes[1:])  # not the first block: no prefix held
    assert affinity.held_blocks("a", hashes) == 0
    affinity.record("a", hashes)
    assert affinity.held_blocks("a", hashes) == 0  # the 4 newest kept; the leading blocks were evicted
    affinity.record("a", hashes[:3])
    assert affinity.held_blocks("a", hashes) == 3


@pytest.mark.e2e
def test_a_shared_prefix_follows_its_replica_even_when_another_is_idle(mesh, gateway):
    prefix = "You are a meticulous archivist. " + " ".join(f"Record {i}: item {i * 7} in box {i % 13}."
                                                            for i in range(40))
    question = lambda q: [common_pb2.ChatMessage(role="system", content=prefix),  # noqa: E731
                          common_pb2.ChatMessage(role="user", content=q)]
    greedy = common_pb2.SamplingParams(max_tokens=4)
    first = gateway.Generate(gateway_pb2.GenerateRequest(messages=question("Which box holds record 3?"),
                                                         sampling=greedy), timeout=60)
    assert first.usage.prompt_tokens > 400
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
    # Nearly the whole shared prefix came from the replica's own prefix cache.
    assert second.usage.cached >= first.usage.prompt_tokens - 48, (second.usage, first.usage)
