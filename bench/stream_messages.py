"""What a token costs on the shard -> gateway stream in gRPC alone, as one message per request per step
(a Generate call per request, `--shard-streams call`) and as one message per step carrying every
request's tokens (the GenerateBatch stream, the default, as TGI's batched generations). The whole
mesh's side-by-side figures come from `bench/throughput.py --call-rows`.

A server process (the shard's side) streams messages to this process (the gateway's side) over
loopback gRPC, as fast as they are read, in the shapes the mesh would send at `--streams` requests:
  per request    : --streams concurrent streams, a ShardGenerateResponse of one token per message
  per connection : one stream, each message --streams entries (a request id and its token)
Printed per shape: tokens/s, and CPU microseconds per token on each side. The mesh at that load pays
the difference on every token, on cores the model needs.

With --step-ms, two more rows, at the pace of one stream's decode steps: a thread (the engine's
stand-in) ticks every step and hands each tick to the server's event loop, which sends it as one
message ("one stream, paced"); and the same ticks with no gRPC ("paced ticks alone"). Each message
then finds both sides asleep, and what waking them costs is what one stream pays per token on each hop.

    .venv/bin/python bench/stream_messages.py [--streams 64] [--tokens 20000] [--step-ms 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.mesh_metrics import cpu_seconds  # noqa: E402
from llmmesh.v1 import common_pb2, gateway_pb2, shard_pb2  # noqa: E402
from services.launcher import free_port  # noqa: E402

PER_REQUEST, PER_CONNECTION = "/bench.Stream/PerRequest", "/bench.Stream/PerConnection"
PACED = "/bench.Stream/Paced"


def _ask(messages: int, width: int) -> shard_pb2.ShardGenerateRequest:
    """The shape asked of the server: `messages` messages of `width` entries each."""
    return shard_pb2.ShardGenerateRequest(prompt_token_ids=[width],
                                          sampling=common_pb2.SamplingParams(max_tokens=messages))


async def _per_request(request: shard_pb2.ShardGenerateRequest, context):
    for i in range(request.sampling.max_tokens):
        yield shard_pb2.ShardGenerateResponse(token_ids=[i % 49152])


async def _per_connection(request: shard_pb2.ShardGenerateRequest, context):
    ids = [f"{i:032x}" for i in range(request.prompt_token_ids[0])]
    for step in range(request.sampling.max_tokens):
        yield gateway_pb2.GenerateResponse(choices=[gateway_pb2.Choice(index=i, text=call, token_ids=[step % 49152])
                                                    for i, call in enumerate(ids)])


async def paced_ticks(count: int, step_s: float):
    """count ticks, one per step_s, made on a thread of their own and handed to this event loop as the
    shard's engine thread hands over its outputs."""
    loop, ticks = asyncio.get_running_loop(), asyncio.Queue()

    def tick() -> None:
        for i in range(count):
            time.sleep(step_s)
            loop.call_soon_threadsafe(ticks.put_nowait, i)
        loop.call_soon_threadsafe(ticks.put_nowait, None)

    threading.Thread(target=tick, daemon=True).start()
    while (i := await ticks.get()) is not None:
        yield i


async def _paced(request: shard_pb2.ShardGenerateRequest, context):
    async for i in paced_ticks(request.sampling.max_tokens, request.prompt_token_ids[0] / 1e6):
        yield shard_pb2.ShardGenerateResponse(token_ids=[i % 49152])


async def serve(port: int) -> None:
    handlers = {
        "PerRequest": grpc.unary_stream_rpc_method_handler(
            _per_request, request_deserializer=shard_pb2.ShardGenerateRequest.FromString,
            response_serializer=shard_pb2.ShardGenerateResponse.SerializeToString),
        "PerConnection": grpc.unary_stream_rpc_method_handler(
            _per_connection, request_deserializer=shard_pb2.ShardGenerateRequest.FromString,
            response_serializer=gateway_pb2.GenerateResponse.SerializeToString),
        "Paced": grpc.unary_stream_rpc_method_handler(
            _paced, request_deserializer=shard_pb2.ShardGenerateRequest.FromString,
            response_serializer=shard_pb2.ShardGenerateResponse.SerializeToString),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Stream", handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _read(channel, method: str, deserialize, requests: list, count) -> int:
    call = channel.unary_stream(method, request_serializer=shard_pb2.ShardGenerateRequest.SerializeToString,
                                response_deserializer=deserialize)

    async def one(request) -> int:
        return sum([count(message) async for message in call(request)])

    return sum(await asyncio.gather(*(one(r) for r in requests)))


async def measure(port: int, server_pid: int, streams: int, tokens: int, step_ms: float | None) -> list[dict]:
    rows = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        shapes = [
            ("per request (a message per token)", PER_REQUEST, shard_pb2.ShardGenerateResponse.FromString,
             [_ask(tokens // streams, 1)] * streams, lambda m: len(m.token_ids)),
            (f"per connection ({streams} tokens per message)", PER_CONNECTION, gateway_pb2.GenerateResponse.FromString,
             [_ask(tokens // streams, streams)], lambda m: sum(len(c.token_ids) for c in m.choices)),
        ]
        if step_ms:
            paced_tokens = min(tokens, int(10_000 / step_ms))  # about ten seconds
            shapes.append((f"one stream, paced ({step_ms:g} ms a token)", PACED, shard_pb2.ShardGenerateResponse.FromString,
                           [_ask(paced_tokens, int(step_ms * 1000))], lambda m: len(m.token_ids)))
        for name, method, deserialize, requests, count in shapes:
            await _read(channel, method, deserialize, [_ask(1, requests[0].prompt_token_ids[0])], count)  # warm
            server_cpu, client_cpu, start = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
            got = await _read(channel, method, deserialize, requests, count)
            wall = time.perf_counter() - start
            rows.append({"name": name, "tokens": got, "tok_s": got / wall,
                         "server_us_per_token": 1e6 * (cpu_seconds(server_pid) - server_cpu) / got,
                         "client_us_per_token": 1e6 * (time.process_time() - client_cpu) / got})
    if step_ms:
        rows.append(await ticks_alone(paced_tokens, step_ms))
    return rows


async def ticks_alone(count: int, step_ms: float) -> dict:
    """The paced row's ticks, thread to event loop, in this process and without gRPC."""
    cpu, start = time.process_time(), time.perf_counter()
    got = sum([1 async for _ in paced_ticks(count, step_ms / 1000)])
    return {"name": "paced ticks alone, no gRPC", "tokens": got, "tok_s": got / (time.perf_counter() - start),
            "server_us_per_token": 1e6 * (time.process_time() - cpu) / got, "client_us_per_token": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64, help="requests decoding at once")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--step-ms", type=float, help="also measure one stream paced at this step time")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        rows = asyncio.run(measure(port, server.pid, args.streams, args.tokens, args.step_ms))
    finally:
        server.kill()
        server.wait()
    print(f"\nloopback gRPC (aio), {args.streams} requests decoding, {args.tokens} tokens; CPU per token by side\n")
    print(f"{'':40} {'tok/s':>9} {'shard side us/tok':>18} {'gateway side us/tok':>20}")
    for r in rows:
        print(f"{r['name']:40} {r['tok_s']:9.0f} {r['server_us_per_token']:18.1f} {r['client_us_per_token']:20.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
