"""Each model family at one size, in the engine: decode tok/s at 1 and 16 streams.

Every family's checkpoint is built here with transformers (random weights, no hub) at SmolLM2-135M's
size: 576 hidden, 9 heads of 64 (3 KV heads), 1536 MLP, 49 152 tokens, --layers layers. The MoE
families have 8 experts of 768, two routed per token: the dense models' active MLP size, so their
rows show what routing costs. The same prompt of --prompt-tokens random tokens for every stream,
answers of --max-tokens with the end token ignored, greedy; rows run one after another, so compare
them within one run.

    .venv/bin/python bench/families.py [--layers 30] [--dtype bfloat16] [--quantization none]
                                       [--families llama3,qwen2,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its kernels.py would shadow the kernels package transformers imports

import torch  # noqa: E402

from services.model_shard.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from services.model_shard.engine.request import SamplingParams  # noqa: E402
from tests.test_families import FAMILIES, MOE  # noqa: E402  (each family's distinguishing config fields)

SIZE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
EXPERTS = {"mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=768),
           "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768, mlp_only_layers=[])}


def build(family: str, layers: int, out: Path) -> Path:
    import transformers

    config_cls, fields = FAMILIES[family]
    # windows and Phi-3's original context of a real size
    fields = {k: (1024 if k in ("sliding_window", "original_max_position_embeddings") else v) for k, v in fields.items()}
    if "query_pre_attn_scalar" in fields:
        fields["query_pre_attn_scalar"] = 64
    rope = fields.get("rope_parameters", {})
    if rope.get("rope_type") == "longrope":  # a factor per rotary pair of a 64-wide head
        fields["rope_parameters"] = {**rope, "short_factor": [1.0 + i / 32 for i in range(32)],
                                     "long_factor": [2.0 + i / 4 for i in range(32)]}
    if "layer_types" in fields:  # Gemma 3: five local layers to one global
        fields["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    config = getattr(transformers, config_cls)(**{**SIZE, **fields, **EXPERTS.get(family, {}),
                                                  "num_hidden_layers": layers})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    return out


def decode_rate(engine: LLMEngine, prompt: list[int], streams: int, max_tokens: int) -> float:
    """Tokens per second of the decode steps (the prefill step excluded)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [engine.add_request(f"s{streams}-{i}-{time.time_ns()}", prompt, params) for i in range(streams)]
    engine.step()  # the prompts
    made, start = sum(len(s.output_token_ids) for s in seqs), time.perf_counter()
    while engine.has_work:
        engine.step()
    return (sum(len(s.output_token_ids) for s in seqs) - made) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quantization = None if args.quantization == "none" else args.quantization
    prompt = torch.randint(3, SIZE["vocab_size"], (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    print(f"{'family':<10} {'kind':<5} | {'1 stream tok/s':>14} {'16 streams tok/s':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            model_dir = build(family, args.layers, Path(tmp) / family)
            engine = LLMEngine.from_dir(model_dir, EngineConfig(dtype=args.dtype, quantization=quantization,
                                                                kv_cache_bytes=512 << 20, enable_prefix_caching=False))
            decode_rate(engine, prompt, 1, 8)  # warm
            row = {"family": family, "moe": family in MOE,
                   "tok_s_1": decode_rate(engine, prompt, 1, args.max_tokens),
                   "tok_s_16": decode_rate(engine, prompt, 16, args.max_tokens)}
            engine.shutdown()
            rows.append(row)
            print(f"{family:<10} {'moe' if row['moe'] else 'dense':<5} | {row['tok_s_1']:>14.1f} "
                  f"{row['tok_s_16']:>16.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
