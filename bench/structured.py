"""Structured output's cost: JSON-schema requests beside unconstrained ones, through the mesh.

At 1 and 16 concurrent streams (--concurrency), each client sends --rounds requests; printed side by side
in one run: tok/s and TTFT p50/p99 for unconstrained requests, for JSON-schema requests whose schema the
shard has seen (cached grammar), and the TTFT of a first-seen schema (each request a new schema).

    .venv/bin/python bench/structured.py [--concurrency 1,16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
from throughput import pct  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402

QUESTION = "Describe a fictional person as JSON: name, age, city and two hobbies."


def schema(variant: int = 0) -> str:
    """A typical API schema; `variant` renames a field, so the grammar is new to the shard."""
    return json.dumps({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        f"city{variant or ''}": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 2}},
        "required": ["name", "age", f"city{variant or ''}", "hobbies"], "additionalProperties": False})


async def _one(stub, sampling: common_pb2.SamplingParams, ttfts: list) -> int:
    request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
                                          sampling=sampling)
    start, tokens = time.perf_counter(), 0
    async for chunk in stub.GenerateStream(request, timeout=600):
        if chunk.token_ids and not tokens:
            ttfts.append(time.perf_counter() - start)
        tokens += len(chunk.token_ids)
    return tokens


async def drive(address: str, streams: int, rounds: int, mode: str, max_tokens: int, fresh: list[int]) -> dict:
    ttfts: list[float] = []

    def sampling() -> common_pb2.SamplingParams:
        s = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=len(ttfts))
        if mode == "json schema":
            s.structured.json_schema = schema()
        elif mode == "first-seen schema":
            fresh[0] += 1
            s.structured.json_schema = schema(fresh[0])
        return s

    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def client() -> int:
            return sum([await _one(stub, sampling(), ttfts) for _ in range(rounds)])

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client() for _ in range(streams))))
        elapsed = time.perf_counter() - start
    return {"name": f"{mode}, {streams} streams", "tokens": tokens, "tok_s": tokens / elapsed,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ports = [free_port() for _ in range(4)]
    plan = plan_mesh(str(args.model), 1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, 0],
                     gateway_metrics_port=0, gateway_args=["--no-response-cache"])
    rows, fresh = [], [0]
    with Mesh(plan, log_dir=Path("/tmp/llmmesh-bench-logs")) as mesh:
        mesh.start()
        asyncio.run(drive(mesh.gateway_address, 2, 1, "json schema", 8, fresh))  # warm-up, and the schema seen
        for streams in (int(x) for x in args.concurrency.split(",")):
            for mode in ("unconstrained", "json schema", "first-seen schema"):
                rows.append(asyncio.run(drive(mesh.gateway_address, streams, args.rounds, mode, args.max_tokens,
                                              fresh)))
                print(f"  measured {rows[-1]['name']}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    print(f"\nSmolLM2-135M-Instruct (the shard's defaults), t=0.8, at most {args.max_tokens} new tokens, "
          f"{args.rounds} requests per stream\n")
    print(f"{'':34} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
    for r in rows:
        print(f"{r['name']:34} {r['tokens']:7d} {r['tok_s']:8.1f} {1000 * r['ttft_p50']:7.1f}ms "
              f"{1000 * r['ttft_p99']:7.1f}ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
