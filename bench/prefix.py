"""Time to first token for a long shared prefix: computed, reused on one replica, reused across replicas.

One mesh (two shard replicas, the cache service sharing KV blocks), run in one process tree.

Part 1, straight to the shards (so the replica is chosen by us), each row a fresh prefix:
  cold                      : replica A computes the whole prompt
  warm, same replica        : A again, same prefix, another question (its own prefix cache)
  warm, across replicas     : replica B, same prefix, a third question (blocks fetched from the cache)

Part 2, through the gateway (chat requests whose system prompt is the long prefix): concurrent
clients, each with its own prefixes, each prefix asked several questions in turn; once with
prefix-affinity routing and once without (a second gateway on the same backends, which then picks
the least busy replica). TTFT is split by the first question of each prefix and the rest.

    .venv/bin/python bench/prefix.py [--model DIR] [--prefix-tokens 512] [--rounds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from llmmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, shard_pb2, shard_pb2_grpc  # noqa: E402
from services.launcher import Mesh, client_channel, free_port, plan_mesh  # noqa: E402

SENTENCES = ["The {0} archive kept letters from every harbour town along the coast.",
             "Each letter in the {0} collection was sorted by the year it was written.",
             "Clerks of the {0} office copied the faded ones by hand every winter.",
             "Visitors to the {0} reading room asked mostly about shipwrecks and storms."]
QUESTIONS = ["What did the archive keep?", "How were the letters sorted?", "Who copied the faded letters?",
             "What did visitors ask about?", "Summarise the text in one sentence.", "Name one thing clerks did."]


def long_text(name: str, tokenizer, tokens: int) -> str:
    text, i = "", 0
    while len(tokenizer.encode(text).ids) < tokens:
        text += " " + SENTENCES[i % len(SENTENCES)].format(f"{name} {i // len(SENTENCES)}")
        i += 1
    return text.strip()


def shard_ttft(address: str, prompt: list[int], token: str | None) -> tuple[float, int]:
    with client_channel(address, token=token) as channel:  # the mesh's internal token: shards serve only the mesh
        stub = shard_pb2_grpc.ModelShardStub(channel)
        start = time.perf_counter()
        request = shard_pb2.ShardGenerateRequest(prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=4))
        stream = stub.Generate(request, timeout=120)
        first = next(stream)
        ttft = time.perf_counter() - start
        for _ in stream:
            pass
    return ttft, first.cached_tokens


def gateway_ttft(stub, system: str, question: str) -> tuple[float, int]:
    request = gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="system", content=system), common_pb2.ChatMessage(role="user", content=question)],
        sampling=common_pb2.SamplingParams(max_tokens=4))
    start, ttft, cached = time.perf_counter(), None, 0
    for chunk in stub.GenerateStream(request, timeout=120):
        if ttft is None:
            ttft = time.perf_counter() - start
        if chunk.HasField("usage"):
            cached = chunk.usage.cached
    return ttft, cached


def cache_blocks(address: str, token: str | None) -> int:
    with client_channel(address, token=token) as channel:
        return cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.CacheStatsRequest(), timeout=10).kv_blocks


def wait_for_blocks(address: str, blocks: int, token: str | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while cache_blocks(address, token) < blocks and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclasses.dataclass
class Row:
    name: str
    ttft_ms: list[float]
    cached_tokens: list[int]

    def summary(self) -> dict:
        return {"name": self.name, "n": len(self.ttft_ms), "ttft_ms_p50": statistics.median(self.ttft_ms),
                "ttft_ms_mean": statistics.fmean(self.ttft_ms), "cached_tokens_mean": statistics.fmean(self.cached_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4, help="fresh prefixes per row")
    parser.add_argument("--clients", type=int, default=2, help="concurrent gateway clients, each with its own prefixes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    ports = [free_port() for _ in range(10)]
    plan = plan_mesh(str(args.model), shards=2, gateway_port=ports[0], ports=ports[1:5], metrics_ports=[0] * 4,
                     gateway_metrics_port=0, shard_args=["--dtype", args.dtype, "--kv-cache-mb", "512"],
                     gateway_args=["--no-response-cache"])
    unrouted = dataclasses.replace(plan.gateway, name="gateway-unrouted", listen=f"127.0.0.1:{ports[5]}",
                                   args=[*plan.gateway.args, "--no-prefix-routing"])
    rows: list[Row] = []
    with Mesh(plan) as mesh:
        mesh.start(timeout=300)
        mesh.start_extra(unrouted, timeout=120)
        a, b = (s.listen for s in plan.shards)
        cold, same, across = Row("cold (replica A)", [], []), Row("warm, same replica (A)", [], []), \
            Row("warm, across replicas (B via cache)", [], [])
        for r in range(args.rounds + 1):  # round 0 warms the processes up
            prefix = tokenizer.encode(long_text(f"shard-run-{r}", tokenizer, args.prefix_tokens)).ids[: args.prefix_tokens]
            q = [tokenizer.encode(" " + question).ids for question in QUESTIONS[:3]]
            token = plan.internal_token
            held = cache_blocks(plan.cache.listen, token)
            results = [shard_ttft(a, prefix + q[0], token), shard_ttft(a, prefix + q[1], token)]
            # uploads run off the token path
            wait_for_blocks(plan.cache.listen, held + args.prefix_tokens // 16, token)
            results.append(shard_ttft(b, prefix + q[2], token))
            if r:
                for row, (ttft, cached) in zip((cold, same, across), results):
                    row.ttft_ms.append(ttft * 1e3)
                    row.cached_tokens.append(cached)
        rows += [cold, same, across]
        for label, address in (("routing on", plan.gateway.listen), ("routing off", unrouted.listen)):
            first, rest = Row(f"gateway, {label}: first question", [], []), Row(f"gateway, {label}: later questions", [], [])
            with grpc.insecure_channel(address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)

                def client(c: int) -> None:  # its own prefixes, asked in turn
                    for r in range(args.rounds + 1):
                        system = long_text(f"{label} client {c} {r}", tokenizer, args.prefix_tokens)
                        for i, question in enumerate(QUESTIONS):
                            ttft, cached = gateway_ttft(stub, system, question)
                            if r:
                                (first if i == 0 else rest).ttft_ms.append(ttft * 1e3)
                                (first if i == 0 else rest).cached_tokens.append(cached)

                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(client, range(args.clients)))
            rows += [first, rest]

    summaries = [row.summary() for row in rows]
    print(f"\nSmolLM2-135M-Instruct {args.dtype}, shared prefix {args.prefix_tokens} tokens, 2 shard replicas + cache, "
          f"{args.rounds} prefixes per row, 4 new tokens")
    print(f"{'':46} {'n':>3} {'TTFT p50 ms':>12} {'TTFT mean ms':>13} {'cached tok':>11}")
    for s in summaries:
        print(f"{s['name']:46} {s['n']:3d} {s['ttft_ms_p50']:12.1f} {s['ttft_ms_mean']:13.1f} {s['cached_tokens_mean']:11.0f}")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
