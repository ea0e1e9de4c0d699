"""Soak: many concurrent streams for a while, with a shard killed and restarted midway.

Prints requests sent / completed (and how many matched an undisturbed answer token for token) /
failed with a status / lost (a stream that ended without finishing or erroring) / hung (no
answer within its deadline). Lost and hung must be 0. Loopback only; bounded in time.

    .venv/bin/python bench/soak.py [--streams 64] [--seconds 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a fruit.", "Say hello in French.", "What is 2 + 2?",
             "Name a color.", "What is water made of?", "Name a planet.", "Who wrote Hamlet?"]


def request(i: int, max_tokens: int) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens))


async def soak(address: str, streams: int, seconds: float, max_tokens: int, expected: list[list[int]],
               timeout: float) -> Counter:
    counts: Counter = Counter()
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def client(c: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                i = c + n * streams
                n += 1
                counts["sent"] += 1
                tokens, finished = [], False
                try:
                    async for chunk in stub.GenerateStream(request(i, max_tokens), timeout=timeout):
                        tokens.extend(chunk.token_ids)
                        finished = finished or bool(chunk.finish_reason)
                except grpc.aio.AioRpcError as exc:
                    counts["hung" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else f"failed {exc.code().name}"] += 1
                    continue
                if not finished:
                    counts["lost"] += 1
                    continue
                counts["completed"] += 1
                counts["correct" if tokens == expected[i % len(QUESTIONS)] else "wrong"] += 1

        await asyncio.gather(*(client(c) for c in range(streams)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--timeout", type=float, default=120, help="per-request deadline; past it counts as hung")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    ports = [free_port() for _ in range(5)]
    plan = plan_mesh(str(args.model), 2, gateway_port=ports[0], ports=ports[1:], metrics_ports=[0, 0, 0, 0],
                     gateway_metrics_port=0, shard_args=["--dtype", args.dtype, "--kv-cache-mb", "512"],
                     gateway_args=["--no-response-cache"])
    events = []
    with Mesh(plan, log_dir=Path("/tmp/llmmesh-soak-logs")) as mesh:
        mesh.start()
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            expected = [[t for c in stub.GenerateStream(request(i, args.max_tokens), timeout=120) for t in c.token_ids]
                        for i in range(len(QUESTIONS))]

        def chaos() -> None:
            time.sleep(args.seconds / 2)  # the schedule of the experiment, not synchronisation
            events.append((time.strftime("%H:%M:%S"), "kill shard-0"))
            mesh.kill("shard-0")
            mesh.restart("shard-0")
            events.append((time.strftime("%H:%M:%S"), "shard-0 serving again"))

        chaos_thread = threading.Thread(target=chaos)
        chaos_thread.start()
        started = time.monotonic()
        counts = asyncio.run(soak(mesh.gateway_address, args.streams, args.seconds, args.max_tokens, expected,
                                  args.timeout))
        elapsed = time.monotonic() - started
        chaos_thread.join()

    for when, what in events:
        print(f"{when}  {what}")
    failed = sum(v for k, v in counts.items() if k.startswith("failed"))
    print(f"\nsoak: {args.streams} streams for {args.seconds:.0f}s (ran {elapsed:.0f}s), 2 shard replicas, "
          f"max {args.max_tokens} tokens, greedy")
    print(f"{'sent':>6} {'completed':>10} {'correct':>8} {'wrong':>6} {'failed':>7} {'lost':>5} {'hung':>5}")
    print(f"{counts['sent']:6d} {counts['completed']:10d} {counts['correct']:8d} {counts['wrong']:6d} {failed:7d} "
          f"{counts['lost']:5d} {counts['hung']:5d}")
    for k, v in sorted(counts.items()):
        if k.startswith("failed"):
            print(f"  {k}: {v}")
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "events": events, "elapsed_s": elapsed}, indent=2))
    if counts["lost"] or counts["hung"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
