"""The model's per-step kernels alone, side by side in one process: a whole step's linears (the 30
layers' qkv, o, gate/up and down projections of SmolLM2-135M) per number of rows, and one step's
paged decode attention over 30 layers' caches (together far beyond L3, as in a real step).

Linears, per row count M (512: a prefill chunk): the native W4A8 and W8A8 kernels
(csrc/quantized_linear.cpp), torch's int4 and int8 weight-packed matmuls, bfloat16 F.linear (oneDNN,
which uses AMX where the CPU has it) and the native batch-invariant dense kernel
(csrc/dense_linear.cpp), all with bfloat16 activations; then float32, torch's (MKL) against the
dense kernel's. Every layer has its own weights, so one step reads them from memory as serving does.
The CPU's AMX / AVX-512 flags head the table.

    .venv/bin/python bench/kernels.py [--rows 1,4,16,32,64,256,512] [--json out.json]
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
import torch.nn.functional as F  # noqa: E402

from services.model_shard.model import native  # noqa: E402
from services.model_shard.model.dense import DenseLinear  # noqa: E402
from services.model_shard.model.precision import cpu_flags  # noqa: E402
from services.model_shard.model.quant import Int4Linear, Int8Linear  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 576, 1536, 9, 3, 64, 30
SHAPES = [(HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTER, HIDDEN),
          (HIDDEN, INTER)]  # (out, in): qkv, o, gate/up, down


def median_ms(step, repeats: int) -> float:
    step()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def linears(rows: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.05 for _ in range(LAYERS) for n, k in SHAPES]
    kinds = {"bfloat16": [lambda x, w=w.bfloat16(): F.linear(x, w) for w in weights],
             "torch int8": [Int8Linear(w, torch.bfloat16) for w in weights],
             "torch int4": [Int4Linear(w, torch.bfloat16) for w in weights]}
    if native.vnni_supported():
        kinds["native W8A8"] = [Int8Linear(w, torch.bfloat16, native_kernel=True) for w in weights]
        kinds["native W4A8"] = [Int4Linear(w, torch.bfloat16, native_kernel=True) for w in weights]
    if native.dense_supported():
        kinds["dense bf16"] = [DenseLinear(w.bfloat16()) for w in weights]
    float32 = {"float32": [lambda x, w=w: F.linear(x, w) for w in weights]}
    if native.dense_supported():
        float32["dense fp32"] = [DenseLinear(w) for w in weights]
    return run_linears(kinds, rows, torch.bfloat16) + run_linears(float32, rows, torch.float32)


def run_linears(kinds: dict, rows: list[int], dtype: torch.dtype) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for m in rows:
        inputs = {k: torch.randn(m, k, generator=gen).to(dtype) for k in (HIDDEN, HEADS * HEAD_DIM, INTER)}
        row = {"rows": m, "dtype": str(dtype).removeprefix("torch.")}
        for name, layers in kinds.items():
            def step():
                for (n, k), layer in zip(SHAPES * LAYERS, layers):
                    layer(inputs[k])
            row[name] = median_ms(step, 20 if m <= 32 else 5)
        out.append(row)
    return out


def attention(batches: list[tuple[int, int]]) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    block = 16
    out = []
    for streams, context in batches:
        blocks = -(-context // block)
        caches = [(torch.randn(KV_HEADS, streams * blocks * block, HEAD_DIM, generator=gen).bfloat16(),
                   torch.randn(KV_HEADS, streams * blocks * block, HEAD_DIM, generator=gen).bfloat16())
                  for _ in range(LAYERS)]
        tables = torch.arange(streams * blocks).view(streams, blocks)
        lengths = torch.full((streams,), context)
        q = torch.randn(streams, HEADS, HEAD_DIM, generator=gen).bfloat16()

        def step():
            for k, v in caches:
                native.paged_decode_attention(q, k, v, tables, lengths, block, HEAD_DIM**-0.5)
        ms = median_ms(step, 20)
        read = streams * context * KV_HEADS * HEAD_DIM * 2 * 2 * LAYERS
        out.append({"streams": streams, "context": context, "ms": ms, "GB/s": read / ms / 1e6})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,32,64,256,512")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not native.available():
        sys.exit("the native kernels are not available here")
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512_bf16", "avx512_vnni")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {' '.join(flags) or 'none of AMX/AVX512-BF16/VNNI'}")
    print("ms per step (30 layers)")
    lin = linears([int(r) for r in args.rows.split(",")])
    for dtype in ("bfloat16", "float32"):
        table = [row for row in lin if row["dtype"] == dtype]
        names = [k for k in table[0] if k not in ("rows", "dtype")]
        print(f"\nlinears, {dtype} activations\n         " + "".join(f"{n:>13}" for n in names))
        for row in table:
            print(f"M={row['rows']:<6} " + "".join(f"{row[n]:13.2f}" for n in names))
    att = attention([(1, 330), (16, 200), (32, 340)])
    print("\npaged decode attention, bfloat16, 9/3 heads of 64")
    for row in att:
        print(f"{row['streams']:3d} streams x {row['context']:4d} tokens  {row['ms']:7.2f} ms  {row['GB/s']:5.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps({"linears": lin, "attention": att}, indent=2))


if __name__ == "__main__":
    main()
