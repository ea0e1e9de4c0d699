"""KV prefix blocks shared across shard replicas through the cache service."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from llmmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, shard_pb2, shard_pb2_grpc
from services.cache.server import CacheServicer
from services.cache.store import LRUByteStore
from services.common.block_hash import chain_block_hashes
from services.common.hash_ring import HashRing
from services.common.kv_wire import CHUNK_BYTES, MalformedStream, from_chunks, to_chunks
from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.trace_view import load_spans

from .conftest import free_ports, metric, wait_for

# --- consistent hashing ---


def test_adding_a_cache_replica_moves_only_its_share_of_keys():
    keys = [i.to_bytes(4, "big") for i in range(20_000)]
    ring = HashRing({f"cache-{i}": i for i in range(3)})
    before = {k: ring.owner(k) for k in keys}
    shares = {n: sum(1 for o in before.values() if o == n) / len(keys) for n in ring.names}
    assert all(0.25 < s < 0.42 for s in shares.values()), shares  # about a third each
    ring.add("cache-3", 3)
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "cache-3" for k in moved)  # keys only move to the new replica
    assert 0.18 < len(moved) / len(keys) < 0.32  # about a quarter
    ring.remove("cache-3")
    assert {k: ring.owner(k) for k in keys} == before


# --- the wire format ---


async def _collect(chunks):
    async def agen():
        for c in chunks:
            yield c

    return [item async for item in from_chunks(agen())]


def test_blocks_larger_than_a_chunk_cross_the_wire_intact():
    blocks = [(b"h1", os.urandom(CHUNK_BYTES * 2 + 17)), (b"h2", b"small"), (b"h3", b"")]
    chunks = list(to_chunks("layout-a", blocks, retained={b"h1"}))
    assert max(len(c.data) for c in chunks) <= CHUNK_BYTES
    assert asyncio.run(_collect(chunks)) == [("layout-a", h, v, h == b"h1") for h, v in blocks]
    cut = chunks[:2]  # the first block without its last chunk
    with pytest.raises(MalformedStream, match="ended inside a block"):
        asyncio.run(_collect(cut))


# --- the engine: export on one, import on another ---


@pytest.mark.parametrize("parallel", [{}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}],
                         ids=["local", "tp2xpp2"])
def test_blocks_exported_by_one_engine_serve_another_with_identical_tokens(tiny_model_dir, ray_cluster, parallel):
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, **parallel)
    a, b = (LLMEngine.from_dir(tiny_model_dir, config) for _ in range(2))
    cold = LLMEngine.from_dir(tiny_model_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    try:
        assert a.kv_layout == b.kv_layout and "tiny-llama" in a.kv_layout
        shared: dict[bytes, bytes] = {}
        a.prompt_block_listener = lambda hashes, data, retain: shared.update(
            (h, data[i].numpy().tobytes()) for i, h in enumerate(hashes))
        prefix = [(7 * i) % 250 + 3 for i in range(40)]  # 10 blocks
        params = SamplingParams(max_tokens=12)
        a.generate([prefix + [11, 12, 13]], params)
        hashes = chain_block_hashes(prefix, 4)
        assert set(hashes) <= set(shared)  # every full prompt block was offered

        prompt = prefix + [21, 22, 23, 24, 25]
        usable = chain_block_hashes(prompt, 4)[: (len(prompt) - 1) // 4]
        assert b.import_blocks(usable, [shared.get(h) for h in usable]) == 10
        warm = b.generate([prompt], params)[0]
        assert warm == cold.generate([prompt], params)[0]
        assert b.stats.computed_tokens == cold.stats.computed_tokens - 40
        # A block of another layout is refused, and nothing is held by the refusal.
        used = b.pool.num_used
        with pytest.raises(ValueError, match="bytes"):
            b.import_blocks([b"x" * 16], [b"short"])
        assert b.pool.num_used == used
    finally:
        a.shutdown()
        b.shutdown()


# --- the cache service: budget, order, idempotence ---


async def _with_cache_service(kv_budget: int, scenario) -> None:
    """scenario(stub) against a real cache service on loopback, in this process."""
    server = grpc.aio.server()
    cache_pb2_grpc.add_CacheServicer_to_server(CacheServicer(LRUByteStore(1 << 20), LRUByteStore(kv_budget)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await scenario(cache_pb2_grpc.CacheStub(channel))
    finally:
        await server.stop(0)


def test_the_kv_store_streams_leading_runs_and_stays_under_its_budget():
    block = 300_000
    budget = 10 * block + 5_000

    async def scenario(stub):
        blocks = [(bytes([i]) * 16, bytes([i]) * block) for i in range(25)]
        reply = await stub.PutKvBlocks(to_chunks("L", blocks[:6]))
        assert reply.stored == 6
        again = await stub.PutKvBlocks(to_chunks("L", blocks[:6]))  # idempotent
        stats = await stub.Stats(cache_pb2.CacheStatsRequest())
        assert again.stored == 6 and stats.kv_blocks == 6

        hashes = [h for h, _ in blocks[:3]] + [b"missing" * 2] + [blocks[4][0]]
        got = [item async for item in from_chunks(stub.GetKvBlocks(
            cache_pb2.GetKvBlocksRequest(layout="L", block_hashes=hashes)))]
        assert [(b.block_hash, b.value) for b in got] == blocks[:3]  # stops at the first gap
        other = [item async for item in from_chunks(stub.GetKvBlocks(
            cache_pb2.GetKvBlocksRequest(layout="M", block_hashes=hashes[:1])))]
        assert other == []  # another layout sees nothing

        await stub.PutKvBlocks(to_chunks("L", blocks[6:]))
        stats = await stub.Stats(cache_pb2.CacheStatsRequest())
        assert stats.kv_bytes <= budget == stats.kv_budget_bytes
        assert stats.kv_blocks == 10 and stats.kv_evictions == 15

        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.PutKvBlocks(to_chunks("", blocks[:1]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(_with_cache_service(budget, scenario))


def test_the_kv_index_streams_a_snapshot_then_what_is_stored_and_evicted():
    block = 100_000
    budget = 4 * block + 4_000  # room for four blocks

    async def scenario(stub):
        blocks = [(bytes([i]) * 16, bytes([i]) * block) for i in range(6)]
        await stub.PutKvBlocks(to_chunks("L", blocks[:2]))
        await stub.PutKvBlocks(to_chunks("M", blocks[5:]))  # another layout's: not in L's index
        index = stub.WatchKvIndex(cache_pb2.WatchKvIndexRequest(layout="L"))
        snapshot = await asyncio.wait_for(index.read(), 10)
        assert snapshot.reset and set(snapshot.added) == {blocks[0][0], blocks[1][0]}
        await stub.PutKvBlocks(to_chunks("L", blocks[:1]))  # a refresh: nothing new, L0 now newest
        await stub.PutKvBlocks(to_chunks("L", blocks[2:4]))  # the budget holds four: L1, the oldest, goes
        seen_added, seen_removed = set(), set()
        while seen_added != {blocks[2][0], blocks[3][0]} or not seen_removed:
            update = await asyncio.wait_for(index.read(), 10)
            assert not update.reset
            seen_added.update(update.added)
            seen_removed.update(update.removed)
        assert seen_removed == {blocks[1][0]}
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.WatchKvIndex(cache_pb2.WatchKvIndexRequest(layout="")).read()
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        index.cancel()

    asyncio.run(_with_cache_service(budget, scenario))


# --- two real shard replicas and a real cache service ---

PREFIX_TOKENS = 512


@pytest.fixture(scope="module")
def kv_mesh(real_model_dir, tmp_path_factory):
    from services.launcher import Mesh, plan_mesh

    ports = free_ports(10)
    plan = plan_mesh(str(real_model_dir), shards=2, gateway_port=ports[0], ports=ports[1:5],
                     metrics_ports=ports[5:9], gateway_metrics_port=ports[9],
                     shard_args=["--kv-cache-mb", "96", "--kv-fetch-timeout", "1.0"],
                     cache_args=["--kv-budget-mb", "64"])
    root = tmp_path_factory.mktemp("kv-mesh")
    with Mesh(plan, env={"LLMMESH_TRACE_DIR": str(root / "traces"), "OTEL_BSP_SCHEDULE_DELAY": "100"},
              log_dir=root / "logs") as m:
        m.start(timeout=240)
        m.trace_dir = root / "traces"
        yield m


def _shard_generate(mesh, index: int, prompt: list[int], max_tokens: int = 8):
    with mesh.channel(mesh.plan.shards[index].listen) as channel:
        stub = shard_pb2_grpc.ModelShardStub(channel)
        request = shard_pb2.ShardGenerateRequest(prompt_token_ids=prompt,
                                                 sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
        messages = list(stub.Generate(request, timeout=120))
    return [t for m in messages for t in m.token_ids], messages[0].cached_tokens


def _cache_stats(mesh):
    with mesh.channel(mesh.plan.cache.listen) as channel:
        return cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.CacheStatsRequest(), timeout=10)


def _step_tokens(mesh, index: int) -> float:
    """Tokens the shard has run through the model (prefill chunks and decodes), from its /metrics."""
    return metric(mesh.plan.shards[index].metrics_port, "llmmesh_step_tokens_sum")


def _text_tokens(model_dir, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


@pytest.mark.e2e
def test_a_prefix_computed_on_one_replica_is_reused_by_another_through_the_cache(kv_mesh, real_model_dir):
    story = ("The lighthouse keeper kept a log of every ship that passed the northern cape. "
             "Each entry noted the weather, the colour of the sails and the hour. ") * 40
    prefix = _text_tokens(real_model_dir, story)[:PREFIX_TOKENS]
    question_a = _text_tokens(real_model_dir, " Question: how many ships passed in winter? Answer:")
    question_b = _text_tokens(real_model_dir, " Question: what did each entry note? Answer:")

    _shard_generate(kv_mesh, 0, prefix + question_a)
    uploaded = (len(prefix) + len(question_a)) // 16
    assert wait_for(lambda: _cache_stats(kv_mesh).kv_blocks >= uploaded, timeout=30)
    assert wait_for(lambda: _index_caught_up(kv_mesh), timeout=30)  # replica B knows the cache holds them

    prompt_b = prefix + question_b
    before = _step_tokens(kv_mesh, 1)
    tokens_b, cached = _shard_generate(kv_mesh, 1, prompt_b)
    assert cached == PREFIX_TOKENS
    # Replica B ran the question's tokens and the decodes, not the shared prefix.
    assert _step_tokens(kv_mesh, 1) - before == len(prompt_b) - PREFIX_TOKENS + len(tokens_b) - 1

    cold = LLMEngine.from_dir(real_model_dir, EngineConfig(kv_cache_bytes=64 << 20, enable_prefix_caching=False))
    assert tokens_b == cold.generate([prompt_b], SamplingParams(max_tokens=8))[0]


def _index_caught_up(mesh) -> bool:
    """Replica B's mirror of the cache's index lists every block the cache holds."""
    return metric(mesh.plan.shards[1].metrics_port, "llmmesh_kv_index_blocks") == _cache_stats(mesh).kv_blocks


@pytest.mark.e2e
def test_a_prompt_no_replica_has_computed_costs_no_round_trip_to_the_cache(kv_mesh, real_model_dir):
    assert wait_for(lambda: _index_caught_up(kv_mesh), timeout=30)
    prompt = _text_tokens(real_model_dir, "A harbour master's letter that nobody has read before. " * 10)
    asked = _cache_stats(kv_mesh).kv_lookups
    skipped = metric(kv_mesh.plan.shards[1].metrics_port, "llmmesh_kv_fetches_skipped_total")
    tokens, cached = _shard_generate(kv_mesh, 1, prompt)
    assert len(tokens) == 8 and cached == 0
    assert _cache_stats(kv_mesh).kv_lookups == asked  # its index said it has none of these blocks
    assert metric(kv_mesh.plan.shards[1].metrics_port, "llmmesh_kv_fetches_skipped_total") == skipped + 1


@pytest.mark.e2e
def test_a_slow_or_dead_cache_never_fails_a_request(kv_mesh, real_model_dir):
    cache = kv_mesh.processes["cache"]
    prompts = [_text_tokens(real_model_dir, f"Note {i}: the tide tables for the harbour list every high water. " * 12)
               for i in range(3)]
    for prompt in prompts:  # computed on replica A: the cache holds their blocks, and B's index says so
        _shard_generate(kv_mesh, 0, prompt)
    held = 3 * (len(prompts[0]) // 16)
    assert wait_for(lambda: _cache_stats(kv_mesh).kv_blocks >= held and _index_caught_up(kv_mesh), timeout=30)
    os.kill(cache.pid, signal.SIGSTOP)  # accepts connections, answers nothing: the fetch times out
    try:
        slow_tokens, slow_cached = _shard_generate(kv_mesh, 1, prompts[0])
        # The replica is now backed off: the next prompt does not ask it (BACKING_OFF below).
        _shard_generate(kv_mesh, 1, prompts[1][:-4])
    finally:
        os.kill(cache.pid, signal.SIGCONT)
    kv_mesh.kill("cache")
    dead_tokens, dead_cached = _shard_generate(kv_mesh, 1, prompts[2])
    assert len(slow_tokens) == len(dead_tokens) == 8 and slow_cached == dead_cached == 0

    def fetch_errors():
        spans = [s for s in load_spans(kv_mesh.trace_dir) if s["name"] == "kv_fetch"]
        return [str(s["attributes"].get("llmmesh.kv_fetch_errors", "")) for s in spans]

    assert wait_for(lambda: any("DEADLINE_EXCEEDED" in e for e in fetch_errors())
                    and any("BACKING_OFF" in e for e in fetch_errors()), timeout=20), fetch_errors()
    kv_mesh.restart("cache")
