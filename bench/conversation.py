"""Time to first token per turn of a 10-turn conversation, three ways side by side in one run:

  stored conversation       : /v1/responses with previous_response_id; the gateway sends the last
                              turn's own token ids plus the new turn (the shard finds them cached)
  full history resent       : /v1/chat/completions with every earlier message, re-encoded each turn
  full history, no prefix   : the same, to a shard with its prefix cache off (every turn prefills
  cache                       the whole history)

Each way's turns carry the same text: the stored conversation's answers are the history the other
two resend. Each way has its own shard (and gateway), on one tokenizer, so none finds blocks another
way computed; only one runs at a time.

    .venv/bin/python bench/conversation.py [--model DIR] [--turns 10] [--answer-tokens 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.launcher import Mesh, ServiceSpec, free_port, plan_mesh  # noqa: E402

QUESTIONS = ["I run a small bakery. Can you help me plan a new menu?", "What breads should I start with?",
             "How long does sourdough take to rise?", "What about pastries for the morning?",
             "Which of those can I prepare the night before?", "How should I price a croissant?",
             "What drinks go well with them?", "How do I keep the bread fresh for a second day?",
             "Suggest a name for a seasonal special.", "Summarise the plan we made."]


def post(address: str, path: str, body: dict) -> http.client.HTTPResponse:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    reply = connection.getresponse()
    if reply.status != 200:
        raise RuntimeError(f"{path}: {reply.status} {reply.read()[:300]!r}")
    return reply


def first_text(address: str, path: str, body: dict, is_text) -> tuple[float, list[dict]]:
    """POST a streamed request; seconds to the first event that carries text, and every event.
    Raw server-sent events, so both APIs are timed alike (no SDK parsing in the figure)."""
    start, ttft, events = time.perf_counter(), None, []
    reply = post(address, path, body)
    for raw in reply:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if ttft is None and is_text(event):
            ttft = time.perf_counter() - start
        events.append(event)
    return ttft, events


def stored_turns(client, model: str, turns: int, tokens: int) -> tuple[list[float], list[str], list[int]]:
    ttfts, answers, prompts, previous = [], [], [], None
    for q in QUESTIONS[:turns]:
        ttft, events = first_text(client, "/v1/responses", {
            "model": model, "input": q, "previous_response_id": previous, "stream": True,
            "max_output_tokens": tokens, "temperature": 0}, lambda e: e["type"] == "response.output_text.delta")
        done = events[-1]["response"]
        ttfts.append(ttft)
        answers.append(done["output"][0]["content"][0]["text"])
        prompts.append(done["usage"]["input_tokens"])
        previous = done["id"]
    return ttfts, answers, prompts


def resent_turns(client, model: str, answers: list[str], tokens: int) -> list[float]:
    ttfts, messages = [], []
    for q, a in zip(QUESTIONS, answers):
        messages.append({"role": "user", "content": q})
        ttft, _ = first_text(client, "/v1/chat/completions", {
            "model": model, "messages": messages, "stream": True, "max_tokens": tokens, "temperature": 0},
            lambda e: e["choices"] and e["choices"][0]["delta"].get("content"))
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": a})
    return ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer-tokens", type=int, default=150)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = args.model.name
    data = Path(tempfile.mkdtemp(prefix="llmmesh-bench-"))
    ports = [free_port() for _ in range(5)]
    plan = plan_mesh(str(args.model), shards=1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0] * 3,
                     gateway_metrics_port=0, shard_args=["--kv-cache-mb", "512"],
                     gateway_args=["--no-response-cache", "--http-listen", f"127.0.0.1:{ports[4]}",
                                   "--conversation-store", f"sqlite:///{data}/store.sqlite3"])
    # Each way on its own shard, so none finds blocks another way computed.
    extra_ports = [free_port() for _ in range(6)]

    def side(name: str, shard_flags: list[str], ports: list[int]) -> tuple[ServiceSpec, ServiceSpec]:
        shard = ServiceSpec(f"shard-{name}", "services.model_shard", f"127.0.0.1:{ports[0]}", 0,
                            ["--model", str(args.model), "--kv-cache-mb", "512", *shard_flags])
        gateway = dataclasses.replace(
            plan.gateway, name=f"gateway-{name}", listen=f"127.0.0.1:{ports[1]}",
            args=["--tokenizer", plan.tokenizer.listen, "--cache", "", "--shards", shard.listen, "--model-name", model,
                  "--no-response-cache", "--http-listen", f"127.0.0.1:{ports[2]}", "--conversation-store", "none"])
        return shard, gateway

    sides = [side("resent", [], extra_ports[:3]), side("cold", ["--no-prefix-caching"], extra_ports[3:])]
    with Mesh(plan) as mesh:
        mesh.start(timeout=300)
        for spec in [spec for pair in sides for spec in pair]:
            mesh.start_extra(spec, timeout=300)
        warm, resent_at, cold = f"127.0.0.1:{ports[4]}", f"127.0.0.1:{extra_ports[2]}", f"127.0.0.1:{extra_ports[5]}"
        for address in (warm, resent_at, cold):  # warm the processes up
            post(address, "/v1/chat/completions", {"model": model, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "Hi"}]}).read()
        post(warm, "/v1/responses", {"model": model, "input": "Hi", "max_output_tokens": 4}).read()  # and the store
        stored, answers, prompts = stored_turns(warm, model, args.turns, args.answer_tokens)
        resent = resent_turns(resent_at, model, answers, args.answer_tokens)
        uncached = resent_turns(cold, model, answers, args.answer_tokens)
    rows = [{"turn": i + 1, "prompt_tokens": prompts[i], "stored_ms": stored[i] * 1e3, "resent_ms": resent[i] * 1e3,
             "resent_no_prefix_cache_ms": uncached[i] * 1e3} for i in range(args.turns)]
    print(f"\n{model}, default dtype and quantization, {args.answer_tokens} new tokens per turn, greedy, 1 shard")
    print(f"{'turn':>4} {'prompt tok':>10} {'stored ms':>10} {'resent ms':>10} {'no prefix cache ms':>19}")
    for r in rows:
        print(f"{r['turn']:4d} {r['prompt_tokens']:10d} {r['stored_ms']:10.1f} {r['resent_ms']:10.1f} "
              f"{r['resent_no_prefix_cache_ms']:19.1f}")
    ratio = rows[-1]["stored_ms"] / rows[0]["stored_ms"]
    print(f"stored: turn {rows[-1]['turn']} TTFT is {ratio:.2f}x turn 1's (target <= 1.5x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "stored_last_over_first": ratio}, indent=2))


if __name__ == "__main__":
    main()
