"""Gateway pieces that need no process: stop strings, validation, response-cache keys, the LRU store."""

from __future__ import annotations

import pytest

from llmmesh.v1 import common_pb2, gateway_pb2
from services.cache.store import LRUByteStore
from services.gateway.response_cache import response_key
from services.gateway.stop_strings import StopStringMatcher
from services.gateway.validation import InvalidRequest, Limits, check_request, resolve_max_tokens


def _run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    out = []
    for d in deltas:
        text, stopped = matcher.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("deltas,stops,expected", [
    (["Hello", " wor", "ld", "!"], ["world"], ("Hello ", True)),
    (["a", "b", "c", "d"], ["bc", "cd"], ("a", True)),
    (["The end.", "\n\nNext"], ["\n\n"], ("The end.", True)),
    (["no", " stop", " here"], ["xyz"], ("no stop here", False)),
    (["ab", "c"], [], ("abc", False)),
    (["wor", "k and world"], ["world"], ("work and ", True)),
])
def test_stop_strings(deltas, stops, expected):
    assert _run(StopStringMatcher(stops), deltas) == expected


def test_stop_string_prefix_is_held_back_not_lost():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abcST") == ("ab", False)  # the last len("STOP") - 1 characters wait
    assert m.feed("ART") == ("cST", False)
    assert m.flush() == "ART"


def _request(**kw) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(**kw)


@pytest.mark.parametrize("request_,message", [
    (_request(), "empty"),
    (_request(prompt="   "), "blank"),
    (_request(prompt="x", messages=[common_pb2.ChatMessage(role="user", content="y")]), "either"),
    (_request(messages=[common_pb2.ChatMessage(role="robot", content="y")]), "role"),
    (_request(prompt="x", sampling=common_pb2.SamplingParams(max_tokens=5000)), "max_tokens"),
    (_request(prompt="x", sampling=common_pb2.SamplingParams(temperature=-1)), "temperature"),
    (_request(prompt="x", sampling=common_pb2.SamplingParams(temperature=float("nan"))), "temperature"),
    (_request(prompt="x", sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
    (_request(prompt="x", sampling=common_pb2.SamplingParams(stop=["a"] * 9)), "stop"),
    (_request(prompt="x", sampling=common_pb2.SamplingParams(stop=[""])), "stop"),
])
def test_bad_requests_are_explained(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        check_request(request_, Limits())


def test_max_tokens_against_the_context():
    limits = Limits(default_max_tokens=256)
    assert resolve_max_tokens(common_pb2.SamplingParams(), 100, 8192, limits) == 256
    assert resolve_max_tokens(common_pb2.SamplingParams(), 8000, 8192, limits) == 192
    with pytest.raises(InvalidRequest, match="context"):
        resolve_max_tokens(common_pb2.SamplingParams(), 8192, 8192, limits)
    with pytest.raises(InvalidRequest, match="lower max_tokens to 92"):
        resolve_max_tokens(common_pb2.SamplingParams(max_tokens=100), 8100, 8192, limits)


def test_response_key_depends_on_every_input():
    base = common_pb2.SamplingParams(temperature=0)
    seeded = common_pb2.SamplingParams(temperature=0.7, seed=1)
    keys = {
        response_key("m", [1, 2, 3], base, 10),
        response_key("m2", [1, 2, 3], base, 10),
        response_key("m", [1, 2, 4], base, 10),
        response_key("m", [1, 2, 3], base, 11),
        response_key("m", [1, 2, 3], seeded, 10),
        response_key("m", [1, 2, 3], common_pb2.SamplingParams(temperature=0.7, seed=2), 10),
        response_key("m", [1, 2, 3], common_pb2.SamplingParams(stop=["x"]), 10),
    }
    assert len(keys) == 7
    assert response_key("m", [1, 2, 3], base, 10) == response_key("m", [1, 2, 3], common_pb2.SamplingParams(), 10)


def test_lru_store_keeps_to_its_budget():
    store = LRUByteStore(budget_bytes=100)
    for i in range(10):
        assert store.put(f"k{i}".encode(), b"x" * 18)  # 20 bytes each
    s = store.stats()
    assert s.entries == 5 and s.bytes == 100 and s.evictions == 5
    assert store.get(b"k0") is None and store.get(b"k9") == b"x" * 18
    store.get(b"k5")  # now most recent
    store.put(b"new", b"y" * 17)
    assert store.get(b"k5") is not None and store.get(b"k6") is None
    assert not store.put(b"huge", b"z" * 200) and store.get(b"huge") is None
    assert store.stats().bytes <= 100


def test_lru_store_evicts_retained_entries_last_within_their_bound():
    store = LRUByteStore(budget_bytes=100, retained_budget=40)  # entries of 20 bytes: 5 fit, 2 retained
    for i in range(3):
        assert store.put(f"c{i}".encode(), b"x" * 18, retain=True)  # the third pushes c0 to the ordinary list
    assert store.retained_bytes == 40
    for i in range(4):
        store.put(f"o{i}".encode(), b"x" * 18)
    # Five fit: the ordinary entries went first (c0 among them), the retained ones stayed.
    assert store.get(b"c1") and store.get(b"c2") and store.get(b"c0") is None and store.get(b"o0") is None
    store.put(b"c1", b"y" * 18)  # refreshed: still retained
    assert store.retained_bytes == 40
    store.put(b"big", b"z" * 77)  # 80 bytes: everything ordinary goes, then the oldest retained
    assert store.get(b"c2") is None and store.get(b"c1") == b"y" * 18 and store.stats().bytes == 100


def test_a_shard_counts_as_serving_only_once_its_health_says_so():
    """A gateway started before its shards is not ready (nor routes to them first) until one answers."""
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from services.gateway.shards import SHARD_SERVICE, ShardPool

    from .conftest import free_ports

    async def scenario():
        up, never = free_ports(2)
        pool = ShardPool([f"127.0.0.1:{up}", f"127.0.0.1:{never}"], backoff_s=0.1)
        changes: list[bool] = []
        serving = asyncio.Event()
        pool.on_availability = lambda available: (changes.append(available), available and serving.set())
        assert not pool.available and all(r.suspect for r in pool.replicas)
        pool.start()
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        await servicer.set(SHARD_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{up}")
        await server.start()
        try:
            await asyncio.wait_for(serving.wait(), 10)
            assert [r.address for r in pool.ordered()][0] == f"127.0.0.1:{up}"
            assert not pool.replicas[1].serving and changes[-1] is True
        finally:
            await pool.close()
            await server.stop(None)

    asyncio.run(scenario())
