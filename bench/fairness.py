"""One tenant's flood against another's real-time requests, first come first served vs fair scheduling.

Tenant A runs --flood streaming clients, each sending requests back to back (mixed prompt lengths,
--a-tokens new tokens each). Tenant B sends --b-requests requests one at a time (--b-tokens each).
Both tenants have the same class and weight: what separates the rows is the shard's scheduling.
Printed, side by side in one run (a fresh mesh per policy, the real model):

  B alone                     B's TTFT and inter-token latency p50/p99
  B under A's flood, fcfs     (the shard's --scheduling fcfs: arrival order)
  B under A's flood, fair     (--scheduling fair: tenants share by weight)
  A's tok/s alone, and under both

    .venv/bin/python bench/fairness.py [--flood 48] [--max-running 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
from throughput import make_prompts, pct  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.gateway.auth import hash_key  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402

KEYS = {"a": "bench-key-a", "b": "bench-key-b"}
B_QUESTION = "What should I pack for a weekend of hiking in the mountains?"


async def _stream(stub, tenant: str, prompt: str, max_tokens: int, ttfts: list, itls: list) -> int:
    request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=prompt)],
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    start, last, tokens = time.perf_counter(), None, 0
    async for chunk in stub.GenerateStream(request, timeout=600, metadata=[("authorization", f"Bearer {KEYS[tenant]}")]):
        now, n = time.perf_counter(), len(chunk.token_ids)
        if n:
            if last is None:
                ttfts.append(now - start)
            else:
                itls.extend([(now - last) / n] * n)
            last, tokens = now, tokens + n
    return tokens


async def _tenant_b(stub, args) -> dict:
    ttfts, itls = [], []
    for _ in range(args.b_requests):
        await _stream(stub, "b", B_QUESTION, args.b_tokens, ttfts, itls)
    return {"ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)}


async def _flood(stub, args, stop: asyncio.Event) -> dict:
    """A's clients until `stop`: A's tok/s and inter-token latency over the flood."""
    prompts = make_prompts(args.flood * 4)
    ttfts, itls = [], []

    async def client(i: int) -> int:
        tokens, n = 0, 0
        while not stop.is_set():
            tokens += await _stream(stub, "a", prompts[(i + n * args.flood) % len(prompts)], args.a_tokens, ttfts, itls)
            n += 1
        return tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(i) for i in range(args.flood))))
    return {"tok_s": tokens / (time.perf_counter() - start), "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)}


async def _measure(address: str, args, alone: bool) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await _stream(stub, "b", B_QUESTION, 4, [], [])  # warm-up
        out = {}
        if alone:
            out["b"] = await _tenant_b(stub, args)
            stop = asyncio.Event()
            flood = asyncio.create_task(_flood(stub, args, stop))
            await asyncio.sleep(args.a_seconds)  # A alone for a fixed time
            stop.set()
            out["a"] = await flood
            return out
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(stub, args, stop))
        await asyncio.sleep(args.settle)  # the flood reaches its steady state first
        out["b"] = await _tenant_b(stub, args)
        stop.set()
        out["a"] = await flood
        return out


def _run(args, policy: str, alone: bool, keys: Path) -> dict:
    ports = [free_port() for _ in range(4)]
    shard_args = ["--scheduling", policy, "--max-running", str(args.max_running), "--dtype", args.dtype,
                  *(["--prefill-tokens-beside-decodes", str(args.prefill_beside_decodes)]
                    if args.prefill_beside_decodes else []),
                  *(["--quantization", args.quantization] if args.quantization else [])]
    plan = plan_mesh(str(args.model), 1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, 0],
                     gateway_metrics_port=0, shard_args=shard_args,
                     gateway_args=["--no-response-cache", "--api-keys-file", str(keys)])
    with Mesh(plan, log_dir=Path("/tmp/llmmesh-bench-logs")) as mesh:
        mesh.start()
        return asyncio.run(_measure(mesh.gateway_address, args, alone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default="int4")
    parser.add_argument("--flood", type=int, default=48, help="tenant A's concurrent streams")
    parser.add_argument("--a-tokens", type=int, default=64)
    parser.add_argument("--b-requests", type=int, default=20)
    parser.add_argument("--b-tokens", type=int, default=32)
    parser.add_argument("--a-seconds", type=float, default=20.0, help="how long A floods alone")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of flood before B starts")
    parser.add_argument("--max-running", type=int, default=32, help="the shard's batch slots")
    parser.add_argument("--prefill-beside-decodes", type=int, help="the shard's cap on prompt tokens per step "
                        "beside decodes (bounds a step's length, so a newcomer's wait for the running step)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text("".join(f"{t} {hash_key(k)}\n" for t, k in KEYS.items()))
        alone = _run(args, "fair", True, keys)
        print("  measured alone", flush=True)
        fcfs = _run(args, "fcfs", False, keys)
        print("  measured the flood, fcfs", flush=True)
        fair = _run(args, "fair", False, keys)
        print("  measured the flood, fair", flush=True)

    rows = [("B alone", alone), ("B under A's flood, fcfs", fcfs), ("B under A's flood, fair", fair)]
    print(f"\nSmolLM2-135M-Instruct {args.dtype} + {args.quantization}, 1 shard of {args.max_running} slots; A: "
          f"{args.flood} streams of {args.a_tokens} tokens; B: {args.b_requests} requests of {args.b_tokens}, "
          f"one at a time\n")
    print(f"{'':28} {'B TTFT p50':>11} {'B TTFT p99':>11} {'B ITL p50':>10} {'B ITL p99':>10} {'A tok/s':>8} "
          f"{'A ITL p99':>10}")
    for name, r in rows:
        b, a = r["b"], r["a"]
        print(f"{name:28} {1000 * b['ttft_p50']:9.0f}ms {1000 * b['ttft_p99']:9.0f}ms {1000 * b['itl_p50']:8.0f}ms "
              f"{1000 * b['itl_p99']:8.0f}ms {a['tok_s']:8.1f} {1000 * a['itl_p99']:8.0f}ms")
    print("\n(A's figures on the first row: A flooding alone)")
    if args.json:
        args.json.write_text(json.dumps({name: r for name, r in rows}, indent=2))


if __name__ == "__main__":
    main()
