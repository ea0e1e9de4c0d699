"""GenerateBatch: many requests on one stream to a real shard process (tiny model). Each request gets
what its own Generate call would, and one message carries every request's tokens of an engine step.
Also the gateway's side of it (shard_batches.py): calls read as Generate calls are, with their
statuses, deadlines and cancels, and a shard without GenerateBatch served by Generate instead."""

from __future__ import annotations

import asyncio
import queue

import grpc
import pytest

from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.common.errors import retry_delay_s
from services.gateway.errors import RpcError
from services.gateway.shard_calls import ShardLost, next_shard_message, open_shard_stream
from services.gateway.shards import ShardPool

from .conftest import (INTERNAL_TOKEN, free_ports, internal_aio_channel, internal_channel, metric, shard_process,
                       wait_for)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def shard_metrics_port():
    return free_ports(1)[0]


@pytest.fixture(scope="module")
def shard(tiny_model_dir, tmp_path_factory, shard_metrics_port):
    with shard_process(tiny_model_dir, tmp_path_factory.mktemp("shard") / "shard.log", "--kv-cache-mb", "16",
                       "--threads", "1", "--max-running", "4", "--max-waiting", "4", "--retry-after", "0.5",
                       "--cache", "", "--metrics-port", str(shard_metrics_port), timeout=60) as (listen, _), \
            internal_channel(listen) as channel:
        yield listen, shard_pb2_grpc.ModelShardStub(channel)


def _request(prompt, max_tokens=16, **sampling) -> shard_pb2.ShardGenerateRequest:
    return shard_pb2.ShardGenerateRequest(prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, **sampling))


def _start(stream_id, request, timeout_s=0.0) -> shard_pb2.BatchRequest:
    return shard_pb2.BatchRequest(start=shard_pb2.BatchStart(stream_id=stream_id, request=request, timeout_s=timeout_s))


def _by_stream(replies) -> dict[int, list[shard_pb2.BatchItem]]:
    items: dict[int, list] = {}
    for reply in replies:
        for item in reply.items:
            items.setdefault(item.stream_id, []).append(item)
    return items


def test_requests_on_one_stream_get_what_their_own_calls_get(shard):
    _, stub = shard
    alone = [[t for msg in stub.Generate(_request(p), timeout=60) for t in msg.token_ids] for p in PROMPTS]
    replies = list(stub.GenerateBatch(iter([_start(i + 1, _request(p)) for i, p in enumerate(PROMPTS)]), timeout=60))
    items = _by_stream(replies)
    for i, tokens in enumerate(alone):
        mine = items[i + 1]
        assert [t for item in mine for t in item.response.token_ids] == tokens
        assert [item.response.finish_reason for item in mine][-1] == "length"
        assert mine[0].response.prompt_tokens == len(PROMPTS[i])
        assert not any(item.status_code for item in mine)
    # A step's tokens for every request in it travel together: far fewer messages than tokens.
    assert any(len({item.stream_id for item in reply.items}) == len(PROMPTS) for reply in replies)
    assert len(replies) < sum(len(t) for t in alone) / 2


def test_a_bad_request_fails_alone_with_its_status(shard):
    _, stub = shard
    requests = [_start(1, _request(PROMPTS[0])), _start(2, _request([])), _start(3, _request([999999]))]
    items = _by_stream(stub.GenerateBatch(iter(requests), timeout=60))
    assert items[2][-1].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "empty" in items[2][-1].status_details
    assert items[3][-1].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "vocabulary" in items[3][-1].status_details
    assert sum(len(item.response.token_ids) for item in items[1]) == 16
    assert items[1][-1].response.finish_reason == "length" and not any(item.status_code for item in items[1])


def test_a_stream_id_used_twice_ends_the_stream(shard):
    """No answer under that id could say which of the two requests it is for."""
    _, stub = shard
    requests = [_start(1, _request(PROMPTS[0], max_tokens=4000)), _start(1, _request(PROMPTS[1]))]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateBatch(iter(requests), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "in use" in err.value.details()


class _Requests:
    """A request iterator fed from the test: the stream stays open until close()."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def send(self, request) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (request := self._queue.get(timeout=60)) is not None:
            yield request


def test_cancel_and_deadline_end_one_request_and_free_it(shard, shard_metrics_port):
    _, stub = shard
    requests = _Requests()
    replies = stub.GenerateBatch(iter(requests), timeout=60)
    requests.send(_start(1, _request(PROMPTS[0], max_tokens=4000)))
    # The tiny model's context (512) ends a request by itself within about 0.5 s: the deadline is before.
    requests.send(_start(2, _request(PROMPTS[1], max_tokens=4000), timeout_s=0.1))
    seen: dict[int, list] = {1: [], 2: []}
    for reply in replies:
        for item in reply.items:
            seen[item.stream_id].append(item)
        if seen[1] and not any(i.status_code for i in seen[1]) and len(seen[1]) == 3:
            requests.send(shard_pb2.BatchRequest(cancel=1))
        if seen[2] and seen[2][-1].status_code:
            break
    assert seen[2][-1].status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert len(seen[1]) >= 3  # so the cancel went out
    # Both long requests leave the engine, while the stream goes on serving others.
    assert wait_for(lambda: metric(shard_metrics_port, "llmmesh_requests_running") == 0, timeout=10)
    for stream_id in range(3, 7):  # as many as the waiting queue (4) holds before a step admits them
        requests.send(_start(stream_id, _request(PROMPTS[stream_id % 3], max_tokens=3)))
    requests.close()
    rest = _by_stream(replies)
    assert not any(i.status_code for i in rest.get(1, []))  # a cancelled request is told nothing more
    assert not any(i.response.finish_reason for i in seen[1] + rest.get(1, []))  # it ended before its end
    assert sum(len(i.response.token_ids) for i in seen[1] + rest.get(1, [])) < 4000
    for stream_id in range(3, 7):
        assert not any(i.status_code for i in rest[stream_id]), rest[stream_id][-1].status_details
        assert sum(len(i.response.token_ids) for i in rest[stream_id]) == 3


def _pool(address: str, batched: bool = True) -> ShardPool:
    pool = ShardPool([address], batched=batched, token=INTERNAL_TOKEN)
    pool.replicas[0].serving = True
    return pool


async def _collect(pool, request, deadline_s=60.0):
    loop = asyncio.get_running_loop()
    replica, call, msg = await open_shard_stream(pool, request, loop.time() + deadline_s, 30.0)
    messages = [msg]
    while not msg.finish_reason:
        msg = await next_shard_message(call)
        messages.append(msg)
    assert await call.read() is grpc.aio.EOF
    replica.end("")
    return call, messages


def test_gateway_calls_on_a_batch_stream_read_as_generate_calls(shard):
    address, stub = shard
    alone = [[t for msg in stub.Generate(_request(p), timeout=60) for t in msg.token_ids] for p in PROMPTS]

    async def run():
        pool = _pool(address)
        try:
            results = await asyncio.gather(*(_collect(pool, _request(p)) for p in PROMPTS))
            for (call, messages), tokens in zip(results, alone):
                assert getattr(call, "batched", False)
                assert [t for m in messages for t in m.token_ids] == tokens
            # A deadline ends the call as a Generate call's would. The tiny model's context (512) ends
            # the request by itself within about 0.5 s, so the deadline is well before that.
            loop = asyncio.get_running_loop()
            with pytest.raises(RpcError) as late:
                _, call, _ = await open_shard_stream(pool, _request(PROMPTS[0], max_tokens=4000), loop.time() + 0.15,
                                                     30.0)
                while True:
                    await next_shard_message(call)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_refusal_through_a_batch_stream_carries_its_retry_delay(shard):
    address, _ = shard

    async def run():
        pool = _pool(address)
        batches = pool.replicas[0].batches
        try:
            calls = [batches.start(_request(p, max_tokens=300), asyncio.get_running_loop().time() + 60)
                     for p in PROMPTS * 4]
            errors = []
            for call in calls:
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
            assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
            assert retry_delay_s(errors[0]) == 0.5
        finally:
            await pool.close()

    asyncio.run(run())


class _OlderShard(shard_pb2_grpc.ModelShardServicer):
    """A shard from before GenerateBatch: Generate only (passed on to a real shard)."""

    def __init__(self, stub):
        self.stub = stub

    async def Generate(self, request, context):
        async for msg in self.stub.Generate(request):
            yield msg

    async def GenerateBatch(self, requests, context):
        # What a server without the method answers. The generated base's handler raises
        # NotImplementedError instead, which grpc.aio sometimes reports as INTERNAL.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield  # an async generator, as a stream-stream handler is


def test_a_shard_without_batch_streams_is_called_per_request(shard):
    address, stub = shard
    tokens = [t for msg in stub.Generate(_request(PROMPTS[0]), timeout=60) for t in msg.token_ids]

    async def run():
        async with internal_aio_channel(address) as channel:
            server = grpc.aio.server()
            shard_pb2_grpc.add_ModelShardServicer_to_server(_OlderShard(shard_pb2_grpc.ModelShardStub(channel)), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            pool = _pool(f"127.0.0.1:{port}")
            try:
                for _ in range(2):
                    call, messages = await _collect(pool, _request(PROMPTS[0]))
                    assert not getattr(call, "batched", False)
                    assert [t for m in messages for t in m.token_ids] == tokens
                assert pool.replicas[0].batches.unsupported
            finally:
                await pool.close()
                await server.stop(0)

    asyncio.run(run())


class _UpgradedShard(_OlderShard):
    """The same address, first without GenerateBatch, then (upgraded) with it."""

    upgraded = False

    async def GenerateBatch(self, requests, context):
        if not self.upgraded:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        async for reply in self.stub.GenerateBatch(requests):
            yield reply


def test_a_shard_upgraded_in_place_gets_its_batch_stream_back(shard):
    """A shard found without GenerateBatch is tried again after recheck_s; still without, the request
    is served per request as before, and once the shard has it, requests go on its stream."""
    address, stub = shard
    tokens = [t for msg in stub.Generate(_request(PROMPTS[1]), timeout=60) for t in msg.token_ids]

    async def run():
        async with internal_aio_channel(address) as channel:
            server, servicer = grpc.aio.server(), _UpgradedShard(shard_pb2_grpc.ModelShardStub(channel))
            shard_pb2_grpc.add_ModelShardServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            pool = _pool(f"127.0.0.1:{port}")
            batches = pool.replicas[0].batches
            try:
                call, messages = await _collect(pool, _request(PROMPTS[1]))
                assert not getattr(call, "batched", False) and batches.unsupported
                batches.recheck_s = 0.0  # look again at the next request: still old, still served
                call, messages = await _collect(pool, _request(PROMPTS[1]))
                assert not getattr(call, "batched", False)
                assert [t for m in messages for t in m.token_ids] == tokens
                servicer.upgraded = True
                call, messages = await _collect(pool, _request(PROMPTS[1]))
                assert getattr(call, "batched", False) and not batches.unsupported
                assert [t for m in messages for t in m.token_ids] == tokens
            finally:
                await pool.close()
                await server.stop(0)

    asyncio.run(run())


def test_a_gateway_told_to_call_per_request_does(shard):
    address, stub = shard
    tokens = [t for msg in stub.Generate(_request(PROMPTS[2]), timeout=60) for t in msg.token_ids]

    async def run():
        pool = _pool(address, batched=False)  # --shard-streams call
        try:
            call, messages = await _collect(pool, _request(PROMPTS[2]))
            assert not getattr(call, "batched", False) and pool.replicas[0].batches is None
            assert [t for m in messages for t in m.token_ids] == tokens
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_shard_that_dies_loses_every_request_on_its_stream(tiny_model_dir, tmp_path):
    with shard_process(tiny_model_dir, tmp_path / "shard.log", "--kv-cache-mb", "16", "--threads", "1",
                       "--cache", "", timeout=60) as (address, proc):
        async def run():
            pool = _pool(address)
            loop = asyncio.get_running_loop()
            try:
                opened = [await open_shard_stream(pool, _request(p, max_tokens=4000), loop.time() + 60, 30.0)
                          for p in PROMPTS]
                await asyncio.to_thread(proc.kill)
                for _, call, _ in opened:
                    with pytest.raises(ShardLost):
                        while True:
                            await next_shard_message(call)
            finally:
                await pool.close()

        asyncio.run(asyncio.wait_for(run(), 60))


def test_a_replica_removed_finishes_its_requests_then_its_stream(shard, shard_metrics_port):
    address, stub = shard
    tokens = [t for msg in stub.Generate(_request(PROMPTS[1], max_tokens=40), timeout=60) for t in msg.token_ids]

    async def run():
        pool = _pool(address)
        loop = asyncio.get_running_loop()
        try:
            _, call, msg = await open_shard_stream(pool, _request(PROMPTS[1], max_tokens=40), loop.time() + 60, 30.0)
            _, endless, _ = await open_shard_stream(pool, _request(PROMPTS[0], max_tokens=4000), loop.time() + 60, 30.0)
            pool.set_addresses([])  # discovery saw its pod go
            endless.cancel()  # its cancel still reaches the shard
            got = list(msg.token_ids)
            while not msg.finish_reason:
                msg = await next_shard_message(call)
                got.extend(msg.token_ids)
            assert got == tokens
            # Its stream ends once those requests have, so the channel closes now, not after a grace period.
            await asyncio.wait_for(asyncio.gather(*pool._closing), 10)
        finally:
            await pool.close()

    computed = metric(shard_metrics_port, "llmmesh_tenant_computed_tokens_total", tenant="none")
    asyncio.run(run())
    assert metric(shard_metrics_port, "llmmesh_requests_running") == 0
    # The cancelled one stopped early: run to the end of the tiny model's context (512), it alone would
    # have computed over 500 tokens.
    assert metric(shard_metrics_port, "llmmesh_tenant_computed_tokens_total", tenant="none") - computed < 300
