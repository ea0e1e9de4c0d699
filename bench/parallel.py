"""Tokens/s of one shard's engine with the local executor beside tensor / pipeline parallel Ray workers.

Same prompts, greedy, in one process tree, one layout after another. On a CPU machine this shows the
cost of splitting (all-reduces and stage hand-offs over gloo on the same cores), not a speed-up: the
split pays off when each rank has its own device (NCCL on GPUs).

    .venv/bin/python bench/parallel.py [--model DIR] [--layouts 1x1,3x1,1x2,3x2] [--streams 1,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.model_shard.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from services.model_shard.engine.request import SamplingParams  # noqa: E402
from services.model_shard.executor.ray_workers import connect_ray  # noqa: E402
from services.tokenizer.text import Message, TextTokenizer  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three uses of copper.", "Why is the sky blue?", "Describe a cat in one sentence.",
             "What is a prime number?", "Name a famous painter."]


def run(model: Path, tp: int, pp: int, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict:
    engine = LLMEngine.from_dir(model, EngineConfig(dtype=dtype, kv_cache_bytes=256 << 20, tensor_parallel_size=tp,
                                                    pipeline_parallel_size=pp))
    try:
        params = SamplingParams(max_tokens=max_tokens)
        engine.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
    tokens = sum(len(o) for o in outputs)
    return {"layout": f"TP={tp} x PP={pp}", "streams": len(prompts), "tokens": tokens,
            "seconds": elapsed, "tokens_per_s": tokens / elapsed, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--layouts", default="1x1,3x1,1x2,3x2", help="TPxPP, comma-separated")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    connect_ray()
    text = TextTokenizer(args.model)
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        prompts = [text.encode_chat([Message("user", QUESTIONS[i % len(QUESTIONS)])]) for i in range(n)]
        reference = None
        for layout in args.layouts.split(","):
            tp, pp = (int(x) for x in layout.split("x"))
            row = run(args.model, tp, pp, prompts, args.max_tokens, args.dtype)
            reference = reference or row["outputs"]
            row["same_tokens_as_first"] = row.pop("outputs") == reference
            rows.append(row)
    print(f"\n{args.model.name} {args.dtype}, greedy, {args.max_tokens} new tokens per stream")
    print(f"{'layout':14} {'streams':>7} {'tok/s':>8} {'same tokens':>12}")
    for r in rows:
        print(f"{r['layout']:14} {r['streams']:7d} {r['tokens_per_s']:8.1f} {str(r['same_tokens_as_first']):>12}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
