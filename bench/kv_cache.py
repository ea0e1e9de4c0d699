"""The int8 KV cache against bfloat16 KV, side by side in one process, on the real model (bfloat16
activations, the weights' quantization as given):

- blocks (and tokens) the same --kv-cache-mb holds, and bytes per token;
- the most concurrent conversations of --conversation-tokens before the first preemption: the block
  pool's capacity over the blocks one conversation takes (no prefix shared), which is where the
  scheduler first finds no free block;
- decode tok/s for 1 and 16 streams at --context tokens: whole decode steps of the model (every
  layer, the LM head, the paged attention over the cache), with each stream's context already in the
  cache (written with random keys and values: the speed does not depend on them, and prefilling
  16 x 4 k tokens on a small CPU would take minutes); bfloat16 and int8 steps alternate, and the
  fastest of --steps counts, so that other work on the machine slows both alike;
- the same at a short context (--short-context), where int8 must not be slower.

Not measured here: a stored conversation's tenth-turn TTFT after 200 others (bench/conversation.py
runs that mesh; pass it --kv-cache-dtype through its shard flags).

    .venv/bin/python bench/kv_cache.py [--kv-cache-mb 1600] [--context 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.model_shard.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from services.model_shard.model.llama import AttentionMetadata, DecodeBatch, load_model  # noqa: E402
from services.model_shard.model.precision import cpu_flags  # noqa: E402

KV_DTYPES = ("auto", "int8")  # auto: the model's bfloat16


def fill_cache(engine: LLMEngine, streams: int, context: int) -> list[list[int]]:
    """Random rows in every layer's cache for the blocks of `streams` contexts; their block tables."""
    bs, executor = engine.config.block_size, engine.executor
    per = -(-(context + 1) // bs)
    if per * streams > engine.pool.num_blocks:
        raise SystemExit(f"{streams} x {context} tokens do not fit {engine.pool.num_blocks} blocks: raise --kv-cache-mb")
    gen = torch.Generator().manual_seed(0)
    for k, v in executor.kv_caches:
        for cache in (k, v):
            if cache.dtype == torch.int8:
                from services.model_shard.model.kv_format import quantize_rows

                d = cache.shape[-1] - 2
                cache[:, : per * streams * bs] = quantize_rows(torch.randn(cache.shape[0], per * streams * bs, d,
                                                                           generator=gen))
            else:
                cache[:, : per * streams * bs] = torch.randn(cache.shape[0], per * streams * bs, cache.shape[-1],
                                                             generator=gen).to(cache.dtype)
    return [list(range(i * per, (i + 1) * per)) for i in range(streams)]


def decode_step(engine: LLMEngine, tables: list[list[int]], context: int):
    """A function that runs one whole decode step of len(tables) streams at `context` tokens."""
    model, bs, streams = engine.executor.model, engine.config.block_size, len(tables)
    ids = torch.randint(0, model.cfg.vocab_size, (streams,), generator=torch.Generator().manual_seed(1))
    pos = context - 1
    meta = AttentionMetadata(slot_mapping=torch.tensor([t[pos // bs] * bs + pos % bs for t in tables]),
                             decode=DecodeBatch.build(list(range(streams)), tables, [context] * streams, bs))
    positions = torch.full((streams,), pos)

    def step() -> None:
        with torch.inference_mode():
            model.compute_logits(model(ids, positions, engine.executor.kv_caches, meta))

    return step


def decode_tok_s(engines: dict, tables: dict, streams: int, context: int, steps: int) -> dict[str, float]:
    """tok/s of each engine's decode steps, the engines' steps interleaved so that a busy machine
    slows them alike; the fastest step of each (the least disturbed)."""
    runs = {kv: decode_step(e, tables[kv][:streams], context) for kv, e in engines.items()}
    best = {kv: float("inf") for kv in runs}
    for _ in range(steps + 1):  # the first round warms up
        for kv, step in runs.items():
            start = time.perf_counter()
            step()
            best[kv] = min(best[kv], time.perf_counter() - start)
    return {kv: round(streams / t, 1) for kv, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--quantization", default=None, choices=[None, "int8", "int4"])
    parser.add_argument("--kv-cache-mb", type=int, default=1600)
    parser.add_argument("--conversation-tokens", type=int, default=2000)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--short-context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    flags = cpu_flags()
    print(f"CPU: {torch.get_num_threads()} threads; AVX-512 {'avx512f' in flags}, VNNI {'avx512_vnni' in flags}, "
          f"BF16 {'avx512_bf16' in flags}, AMX {'amx_bf16' in flags}")
    model = load_model(args.model, torch.bfloat16, args.quantization)
    engines, tables, results = {}, {}, {}
    for kv in KV_DTYPES:
        engine = LLMEngine(model, EngineConfig(dtype="bfloat16", quantization=args.quantization,
                                               kv_cache_bytes=args.kv_cache_mb << 20, kv_cache_dtype=kv))
        cap = engine.kv_capacity
        per_conversation = -(-args.conversation_tokens // cap.block_size)
        results[engine.kv_cache_dtype] = {"blocks": cap.blocks, "tokens": cap.tokens,
                                          "bytes_per_token": cap.bytes_per_token,
                                          "conversations_before_preemption": cap.blocks // per_conversation}
        engines[engine.kv_cache_dtype] = engine
        tables[engine.kv_cache_dtype] = fill_cache(engine, 16, args.context)
    for streams, context in ((1, args.context), (16, args.context), (1, args.short_context), (16, args.short_context)):
        for kv, tok_s in decode_tok_s(engines, tables, streams, context, args.steps).items():
            results[kv][f"decode_tok_s_{streams}x{context}"] = tok_s

    names = list(results)
    print(f"\nKV cache {args.kv_cache_mb} MiB, weights {args.quantization or 'bfloat16'}")
    print(f"{'':38}" + "".join(f"{n:>12}" for n in names) + f"{'int8/bf16':>12}")
    for key in results[names[0]]:
        values = [results[n][key] for n in names]
        print(f"{key:38}" + "".join(f"{v:>12}" for v in values) + f"{values[1] / values[0]:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"kv_cache_mb": args.kv_cache_mb, "quantization": args.quantization,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
