"""What the network costs: the same greedy load through a mesh on loopback, on simulated hosts (network
namespaces, tests/cluster.py) with 0, 1 and 5 ms one-way delay on every link, and with one shard split
TP=3 over two Ray hosts. Printed side by side in one run: TTFT and inter-token p50/p99 at 1 and 16 streams.

One shard replica each, the real model with the shard's defaults, the response cache off. The delays
are made by tests/cluster.py's user-space wire on what every host sends to the others (the client's own
link to the gateway stays on the bridge). Below the table: round trips before the first token, as the
delayed rows' extra TTFT over one round trip. Needs root (network namespaces).

    .venv/bin/python bench/network.py [--concurrency 1,16] [--rounds 3] [--max-tokens 64] [--json out.json]
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
from throughput import pct  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402
from tests.cluster import RAY_ENV, Cluster, cluster_unavailable, start_mesh, start_ray  # noqa: E402

QUESTION = "Tell me about the rivers of Europe."
MESH_HOSTS = ["gateway", "tokenizer", "cache", "shard0"]
FIRST_TOKEN_SAMPLES = 30  # one-token requests, one at a time, per delay: the round trips' count


async def _stream(stub, max_tokens: int, ttfts: list, itls: list) -> None:
    request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    start = last = time.perf_counter()
    async for chunk in stub.GenerateStream(request, timeout=600):
        now = time.perf_counter()
        if not chunk.token_ids:
            continue
        if last == start:
            ttfts.append(now - start)
        else:
            itls.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
        last = now


async def _load(address: str, streams: int, rounds: int, max_tokens: int) -> dict:
    ttfts, itls = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def client():
            for _ in range(rounds):
                await _stream(stub, max_tokens, ttfts, itls)

        await asyncio.gather(*(client() for _ in range(streams)))
    return {"ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)}


def _measure(name: str, address: str, args) -> list[dict]:
    asyncio.run(_load(address, 2, 1, 8))  # warm-up: connections, kernels, the prompt's prefix
    rows = []
    for streams in (int(x) for x in args.concurrency.split(",")):
        rows.append({"name": f"{name}, {streams} streams", **asyncio.run(_load(address, streams, args.rounds,
                                                                               args.max_tokens))})
        print(f"  measured {rows[-1]['name']}", flush=True)
    return rows


def loopback(args, logs: Path) -> list[dict]:
    ports = [free_port() for _ in range(4)]
    plan = plan_mesh(str(args.model), 1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, 0],
                     gateway_metrics_port=0, gateway_args=["--no-response-cache"])
    with Mesh(plan, log_dir=logs / "loopback") as mesh:
        mesh.start()
        return _measure("loopback", mesh.gateway_address, args)


def hosts(args, logs: Path, delays_ms: list[float]) -> tuple[list[dict], dict[float, float]]:
    (logs / "hosts").mkdir()
    with Cluster(MESH_HOSTS, logs / "hosts") as cluster:
        gateway = start_mesh(cluster, args.model, {"shard0": []}, gateway_args=["--no-response-cache"])
        rows, first_token = [], {}
        for delay in delays_ms:
            for host in MESH_HOSTS:
                cluster.shape(host, delay_ms=delay)
            rows += _measure(f"hosts, {delay:g} ms one way", gateway, args)
            first_token[delay] = asyncio.run(_load(gateway, 1, FIRST_TOKEN_SAMPLES, 1))["ttft_p50"]
        return rows, first_token


def round_trips(first_token: dict[float, float]) -> list[str]:
    """One-token requests' TTFT p50 at each delay, and its extra over 0 ms in round trips."""
    return [f"{delay:g} ms one way: one-token TTFT p50 {1000 * ttft:.1f} ms"
            + (f", {(ttft - first_token[0]) / (2 * delay / 1000):.1f} round trips more than at 0 ms" if delay else "")
            for delay, ttft in first_token.items()]


def split_over_ray_hosts(args, logs: Path) -> list[dict]:
    (logs / "ray").mkdir()
    with Cluster([*MESH_HOSTS, "rayhead", "raynode"], logs / "ray", subnet=3) as cluster:
        # The model's 9 heads split 3 ways: two workers on one host, one on the other.
        head = start_ray(cluster, "rayhead", {"rayhead": 2, "raynode": 1, "shard0": 0})
        gateway = start_mesh(cluster, args.model, {"shard0": ["--tensor-parallel-size", "3", "--placement-strategy",
                                                              "SPREAD"]},
                             gateway_args=["--no-response-cache"], env={**RAY_ENV, "RAY_ADDRESS": head})
        return _measure("TP=3 over two Ray hosts", gateway, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if cluster_unavailable():
        sys.exit(f"simulated hosts are not available here: {cluster_unavailable()}")
    logs = Path(tempfile.mkdtemp(prefix="llmmesh-network-"))
    host_rows, first_token = hosts(args, logs, [0, 1, 5])
    rows = loopback(args, logs) + host_rows + split_over_ray_hosts(args, logs)
    print(f"\nSmolLM2-135M-Instruct (the shard's defaults), greedy, {args.max_tokens} new tokens, {args.rounds} "
          f"requests per stream; logs in {logs}\n")
    print(f"{'':38} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for r in rows:
        print(f"{r['name']:38} {1000 * r['ttft_p50']:7.1f}ms {1000 * r['ttft_p99']:7.1f}ms "
              f"{1000 * r['itl_p50']:6.1f}ms {1000 * r['itl_p99']:6.1f}ms")
    print("\nBefore the first token (response cache off):", *round_trips(first_token), sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "one_token_ttft_p50": first_token}, indent=2))


if __name__ == "__main__":
    main()
