"""Speculative decoding through the mesh: the same workloads with it off and on, side by side.

Two meshes run at once, one with --speculative off and one with --speculative METHOD (suffix by
default), and each cell of the table runs on one, then at once on the other (this machine's speed
drifts between minutes more than a cell takes). Workloads, greedy:
  copy-heavy : rewrite a given paragraph with its mistakes corrected; extract a given record as JSON
  repeated   : FAQ questions, each asked before by another customer (a different system prompt, so
               the response cache misses and the answer comes from the model)
  open chat  : questions asked once, no repetition
Each at 1, 4, 16 and 64 concurrent streams. Columns: completion tok/s over the cell's wall time,
inter-token p50/p99 (tokens that came in one message share their gap), and the share of proposed
tokens the model accepted (the speculating shard's /metrics).

    .venv/bin/python bench/speculative.py [--method suffix] [--streams 1,4,16,64] [--max-tokens 96]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.latency import Run  # noqa: E402
from bench.mesh_metrics import scrape  # noqa: E402
from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402

PARAGRAPH = ("Our store open every day from nine in the morning untill six in the evening, exept on public "
             "holidays. Customers can returns any item within thirty days if they keeps the receipt, and "
             "refunds is paid to the original card within five working days.")
RECORDS = ["Order 48213 was placed by Maria Lopez on 3 May 2026 for two blue kettles at 34.50 euros each, "
           "shipped to 12 Rue Verte, Lyon.",
           "Ticket 7731: customer Chen Wei reported on 14 June 2026 that the router model AX-300 drops the "
           "connection every evening; priority high, assigned to Sam Patel."]
FAQ = ["How do I reset my password?", "Can I change the delivery address after ordering?",
       "What is your refund policy?", "How long does shipping to Canada take?",
       "Do you offer gift cards?", "How can I cancel my subscription?",
       "Is my payment information stored securely?", "What do I do if my parcel arrives damaged?"]
CUSTOMERS = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
OPEN = ["Write a short poem about the sea at night.", "Describe a city that floats in the clouds.",
        "Invent a new board game and explain its rules.", "Tell a story about a lost umbrella.",
        "What would a robot cook for breakfast?", "Describe the taste of a colour.",
        "Write a letter from a cat to its owner.", "Imagine a festival on the moon and describe it."]


def support(customer: str, question: str) -> list[common_pb2.ChatMessage]:
    system = f"You are the support assistant of Northwind Shop. You are talking to {customer}."
    return [common_pb2.ChatMessage(role="system", content=system), common_pb2.ChatMessage(role="user", content=question)]


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role="user", content=text)]


def workload(name: str, count: int, round_: int) -> list[list[common_pb2.ChatMessage]]:
    """count conversations of a workload; round_ makes each cell's open chat and customers its own."""
    if name == "copy-heavy":
        tasks = [f"Rewrite this paragraph with its spelling and grammar corrected:\n\n{PARAGRAPH}",
                 *(f"Extract this record as JSON with the fields it names:\n\n{r}" for r in RECORDS)]
        return [user(f"{tasks[i % len(tasks)]}\n\n(Reference {round_}-{i}.)") for i in range(count)]
    if name == "repeated":
        return [support(CUSTOMERS[(i + round_ * 5) % len(CUSTOMERS)] + f" #{round_}-{i}", FAQ[i % len(FAQ)])
                for i in range(count)]
    return [user(f"{OPEN[(i + round_) % len(OPEN)]} (#{round_}-{i})") for i in range(count)]


def ask(stub, messages, max_tokens: int):
    request = gateway_pb2.GenerateRequest(messages=messages, sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    run = Run()
    for chunk in stub.GenerateStream(request, timeout=600):
        run.tokens(len(chunk.token_ids))
    return run.row()


def cell(stub, conversations, streams: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        rows = list(pool.map(lambda m: ask(stub, m, max_tokens), conversations))
    wall = time.perf_counter() - start
    gaps = sorted(g for r in rows for g in r[3])
    return {"tok_s": sum(r[1] for r in rows) / wall,
            "itl_ms_p50": 1000 * statistics.median(gaps) if gaps else float("nan"),
            "itl_ms_p99": 1000 * gaps[int(0.99 * (len(gaps) - 1))] if gaps else float("nan")}


def acceptance(before: dict, after: dict) -> float:
    proposed = after.get("llmmesh_speculative_proposed_tokens_total", 0) - before.get(
        "llmmesh_speculative_proposed_tokens_total", 0)
    accepted = after.get("llmmesh_speculative_accepted_tokens_total", 0) - before.get(
        "llmmesh_speculative_accepted_tokens_total", 0)
    return accepted / proposed if proposed else float("nan")


def start_mesh(model: Path, method: str) -> tuple[Mesh, int]:
    ports = [free_port() for _ in range(7)]
    plan = plan_mesh(str(model), shards=1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=ports[4:7],
                     gateway_metrics_port=0, shard_args=["--speculative", method, "--kv-cache-mb", "512"],
                     gateway_args=["--no-response-cache"])  # every answer from the model
    mesh = Mesh(plan)
    mesh.start(timeout=300)
    return mesh, ports[6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--method", default="suffix", choices=["ngram", "suffix", "auto"])
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--workloads", default="copy-heavy,repeated,open chat")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--requests", type=int, default=4, help="requests per stream in the one-stream cells")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    meshes = {"off": start_mesh(args.model, "off"), args.method: start_mesh(args.model, args.method)}
    results = []
    try:
        stubs = {k: gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(m.gateway_address)) for k, (m, _) in meshes.items()}
        for key, stub in stubs.items():  # warm both, and give the repeated questions their first askers
            for messages in workload("repeated", len(FAQ), 0) + workload("copy-heavy", 3, 0):
                ask(stub, messages, args.max_tokens)
        print(f"{'workload':<11} {'streams':>7} | {'off tok/s':>9} {'p50':>6} {'p99':>6} | "
              f"{'on tok/s':>9} {'p50':>6} {'p99':>6} {'accept':>6} | {'ratio':>5}")
        for round_, name in enumerate(args.workloads.split(","), start=1):
            for streams in (int(s) for s in args.streams.split(",")):
                conversations = workload(name, streams * (args.requests if streams == 1 else 1), round_ * 100 + streams)
                row = {"workload": name, "streams": streams}
                for key, stub in stubs.items():
                    before = scrape(meshes[key][1])
                    row[key] = cell(stub, conversations, streams, args.max_tokens)
                    row[key]["acceptance"] = acceptance(before, scrape(meshes[key][1]))
                off, on = row["off"], row[args.method]
                row["ratio"] = on["tok_s"] / off["tok_s"]
                results.append(row)
                print(f"{name:<11} {streams:>7} | {off['tok_s']:>9.1f} {off['itl_ms_p50']:>6.1f} "
                      f"{off['itl_ms_p99']:>6.1f} | {on['tok_s']:>9.1f} {on['itl_ms_p50']:>6.1f} "
                      f"{on['itl_ms_p99']:>6.1f} {on['acceptance']:>6.2f} | {row['ratio']:>5.2f}", flush=True)
    finally:
        for mesh, _ in meshes.values():
            mesh.stop()
    if args.json:
        args.json.write_text(json.dumps({"method": args.method, "max_tokens": args.max_tokens, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
