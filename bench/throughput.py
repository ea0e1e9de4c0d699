"""Throughput and latency under concurrency, beside transformers serving the same requests.

For each N in --concurrency, N streaming clients each send --rounds requests through the gateway
(real model, chat prompts of mixed lengths, response cache off). Printed per N: TTFT p50/p99,
inter-token latency p50/p99 (gap between stream messages, per token), aggregate output tokens/s,
internal messages per token, and the CPU per token spent outside the engine: the gateway's, and the
rest's (the shard's threads other than its engine's, the tokenizer, the cache), which on a small machine
the model pays for.

In the same run, on the workload of --baseline-n requests arriving together:
  (a) transformers generate, one request after another (how a naive server answers)
  (b) transformers generate, one static batch (left-padded; runs until its longest answer ends)
  (c) llama-cpp-python on the same GGUF, one request at a time like its server (when installed)

    .venv/bin/python bench/throughput.py [--dtype bfloat16] [--quantization int8] [--json out.json]
        [--sampling greedy,t1.0,t0.8-p0.95]   (sampled rows beside greedy, in one run)
        [--choices 4]   (one request with n=4 beside 4 requests with its prompt: tok/s and KV blocks)
        [--call-rows]   (each row also through a gateway making one shard call per request)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from bench.mesh_metrics import cpu_per_token, messages_per_token, outside_engine_cpu, scrape  # noqa: E402
from services.launcher import Mesh, ServiceSpec, free_port, plan_mesh  # noqa: E402
from services.model_shard.engine.engine import DTYPES  # noqa: E402

TOPICS = ["the ocean", "volcanoes", "the history of bread", "how bees make honey", "the moon landing",
          "why the sky is blue", "electric cars", "the game of chess", "rainforests", "the printing press",
          "black holes", "the human heart", "coffee", "the Roman empire", "photosynthesis", "trains"]
CONTEXT = ("Background notes: the reader is a curious student who likes clear examples, short sentences, "
           "and facts that can be checked. Avoid lists; write in plain prose. ")


def make_prompts(n: int) -> list[str]:
    """Mixed lengths: every third prompt carries 1-4 paragraphs of extra context."""
    prompts = []
    for i in range(n):
        extra = CONTEXT * (1 + (i // 3) % 4) * 3 if i % 3 == 0 else ""
        prompts.append(f"{extra}Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}.")
    return prompts


# --sampling modes: what the clients ask for (temperature 1.0 is the OpenAI API's default).
SAMPLING = {"greedy": {}, "t1.0": {"temperature": 1.0}, "t0.8-p0.95": {"temperature": 0.8, "top_p": 0.95}}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_stream(stub, prompt: str, max_tokens: int, ttfts: list, itls: list, mode: str = "greedy") -> int:
    request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=prompt)],
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **SAMPLING[mode]))
    start = time.perf_counter()
    last, tokens = None, 0
    async for chunk in stub.GenerateStream(request, timeout=600):
        now = time.perf_counter()
        n = len(chunk.token_ids)
        if n:
            if last is None:
                ttfts.append(now - start)
            else:
                itls.extend([(now - last) / n] * n)
            last = now
            tokens += n
    return tokens


async def drive(address: str, n: int, rounds: int, max_tokens: int, mode: str = "greedy") -> dict:
    prompts = make_prompts(n * rounds)
    ttfts, itls = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def client(i: int) -> int:
            return sum([await one_stream(stub, prompts[i * rounds + r], max_tokens, ttfts, itls, mode)
                        for r in range(rounds)])

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client(i) for i in range(n))))
        elapsed = time.perf_counter() - start
    name = f"mesh N={n}" + ("" if mode == "greedy" else f" {mode}")
    return {"name": name, "requests": n * rounds, "tokens": tokens, "tok_s": tokens / elapsed,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)}


def _blocks_allocated(metrics_port: int) -> float:
    return scrape(metrics_port)["llmmesh_kv_blocks_allocated_total"]


def second_gateway(mesh: Mesh, extra_args: list[str]) -> tuple[str, int, subprocess.Popen]:
    """Another gateway on the same tokenizer, cache and shards, with extra_args, stopped with the mesh:
    (address, metrics port, process)."""
    spec = ServiceSpec("gateway-b", "services.gateway", f"127.0.0.1:{free_port()}", free_port(),
                       [*mesh.plan.gateway.args, *extra_args])
    mesh.start_extra(spec, timeout=60)
    asyncio.run(drive(spec.listen, 4, 1, 1))  # its channels up before it is measured
    return spec.listen, spec.metrics_port, mesh.processes[spec.name]


def engine_row(args, n: int, rounds: int, max_tokens: int) -> dict:
    """The same load on the engine in-process, stepped directly (no gRPC, no gateway): n clients, each
    sending its next prompt when its last answer ends, greedy. The mesh rows' reference."""
    from services.model_shard.engine.engine import EngineConfig, LLMEngine
    from services.model_shard.engine.request import SamplingParams
    from services.tokenizer.text import Message, TextTokenizer

    tok = TextTokenizer(args.model)
    prompts = [tok.encode_chat([Message("user", t)]) for t in make_prompts(n * rounds)]
    engine = LLMEngine.from_dir(args.model, EngineConfig(
        dtype=args.dtype, quantization=args.quantization, kv_cache_bytes=1024 << 20, max_running=128,
        max_batched_tokens=args.max_batched_tokens, prefill_tokens_beside_decodes=args.prefill_beside_decodes))
    engine.generate(prompts, SamplingParams(max_tokens=1))  # prefilled once, as the mesh rows' warm-up does
    start, tokens = time.perf_counter(), 0
    running = [(engine.add_request(f"c{client}-0", prompts[client * rounds], SamplingParams(max_tokens=max_tokens)),
                client, 0) for client in range(n)]  # (sequence, client, its request number)
    while engine.has_work:
        engine.step()
        for item in [item for item in running if item[0].finish_reason is not None]:
            seq, client, r = item
            running.remove(item)
            tokens += len(seq.output_token_ids)
            if r + 1 < rounds:
                running.append((engine.add_request(f"c{client}-{r + 1}", prompts[client * rounds + r + 1],
                                                   SamplingParams(max_tokens=max_tokens)), client, r + 1))
    elapsed = time.perf_counter() - start
    return {"name": f"engine in-process N={n}", "requests": n * rounds, "tokens": tokens, "tok_s": tokens / elapsed}


async def drive_choices(address: str, metrics_port: int, n: int, max_tokens: int, as_choices: bool) -> dict:
    """One request with n choices, or n requests with one prompt, all at once (t=1.0, seeded, every
    answer max_tokens long): tok/s, TTFT, and the KV blocks the shard handed out for them."""
    topic = "ships" if as_choices else "trains"  # first, so that neither row finds the other's blocks cached
    prompt = f"About {topic}. {CONTEXT * 12}Write a detailed paragraph about {topic}."
    sampling = dict(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
    if as_choices:
        requests = [common_pb2.SamplingParams(**sampling, seed=100, n=n)]
    else:
        requests = [common_pb2.SamplingParams(**sampling, seed=100 + i) for i in range(n)]
    ttfts, prompt_tokens = [], []
    before = _blocks_allocated(metrics_port)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(s) -> int:
            start, tokens, first = time.perf_counter(), 0, True
            request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=prompt)], sampling=s)
            async for chunk in stub.GenerateStream(request, timeout=600):
                if chunk.token_ids and first:
                    first = False
                    ttfts.append(time.perf_counter() - start)
                tokens += len(chunk.token_ids)
                if chunk.HasField("usage"):
                    prompt_tokens.append(chunk.usage.prompt_tokens)
            return tokens

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(s) for s in requests)))
        elapsed = time.perf_counter() - start
    name = f"n={n}, one request" if as_choices else f"{n} requests, one prompt"
    return {"name": name, "requests": len(requests), "tokens": tokens, "tok_s": tokens / elapsed,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": float("nan"), "itl_p99": float("nan"),
            "kv_blocks": _blocks_allocated(metrics_port) - before, "prompt_tokens": prompt_tokens[0]}


def transformers_baselines(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], max_tokens: int,
                           eos: list[int]) -> list[dict]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rows = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=eos[0])  # warm up
        # (a) one after another: request i waits for every request before it.
        clock, ttfts, itls, tokens = 0.0, [], [], 0
        for ids in prompts:
            t = time.perf_counter()
            model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=eos[0])
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0])
            total = time.perf_counter() - t
            n = out.shape[1] - len(ids)
            ttfts.append(clock + first)
            itls.extend([(total - first) / max(n - 1, 1)] * max(n - 1, 0))
            clock += total
            tokens += n
        rows.append({"name": "transformers sequential", "requests": len(prompts), "tokens": tokens,
                     "tok_s": tokens / clock, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
                     "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)})
        # (b) one static batch, left-padded.
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[eos[0]] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=eos[0])
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0])
        total = time.perf_counter() - t
        new = out[:, width:]
        steps = new.shape[1]
        tokens = 0
        for row in new.tolist():  # count up to and including each row's end token
            ended = [i for i, tok in enumerate(row) if tok in eos]
            tokens += ended[0] + 1 if ended else len(row)
        rows.append({"name": f"transformers static batch {len(prompts)}", "requests": len(prompts), "tokens": tokens,
                     "tok_s": tokens / total, "ttft_p50": first, "ttft_p99": first,
                     "itl_p50": (total - first) / max(steps - 1, 1), "itl_p99": (total - first) / max(steps - 1, 1)})
    return rows


def llama_cpp_baseline(model_dir: Path, prompts: list[str], max_tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    ggufs = sorted(model_dir.glob("*.gguf"))
    if not ggufs:
        print("llama-cpp-python is installed but no .gguf is in the model folder; skipping it")
        return None
    llm = Llama(model_path=str(ggufs[0]), n_ctx=4096, n_threads=2, verbose=False)
    clock, ttfts, itls, tokens = 0.0, [], [], 0
    for p in prompts:  # its server runs one request at a time
        t = time.perf_counter()
        first, last, n = None, None, 0
        for _ in llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=max_tokens,
                                            temperature=0, stream=True):
            now = time.perf_counter()
            if first is None:
                first = now - t
            elif last is not None:
                itls.append(now - last)
            last = now
            n += 1
        ttfts.append(clock + (first or 0))
        clock += time.perf_counter() - t
        tokens += n
    return {"name": "llama-cpp-python sequential", "requests": len(prompts), "tokens": tokens, "tok_s": tokens / clock,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--sampling", default="greedy",
                        help=f"comma-separated, each measured at every concurrency: {', '.join(SAMPLING)}")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--baseline-n", type=int, default=16)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--shard-threads", type=int, help="torch threads in the shard (default: all cores)")
    parser.add_argument("--max-batched-tokens", type=int, default=256, help="the shard's token budget per step")
    parser.add_argument("--prefill-beside-decodes", type=int,
                        help="the shard's cap on prompt tokens in a step that carries decodes")
    parser.add_argument("--no-kv-sharing", action="store_true",
                        help="shards do not upload/fetch KV prefix blocks through the cache service")
    parser.add_argument("--no-native-kernels", action="store_true",
                        help="the shard runs on stock torch ops instead of the native kernels (model/native.py)")
    parser.add_argument("--call-rows", action="store_true",
                        help="also measure each row through a second gateway making one shard call per request "
                             "(--shard-streams call) on the same shard, interleaved with the batch-stream rows")
    parser.add_argument("--choices", type=int, default=4, help="n of the choices rows (0: none)")
    parser.add_argument("--engine-rows", action="store_true",
                        help="also run each concurrency on the engine in-process (greedy), for mesh/engine ratios")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    ports = [free_port() for _ in range(4)]
    shard_args = ["--dtype", args.dtype, "--kv-cache-mb", "1024", "--max-running", "128",
                  "--max-batched-tokens", str(args.max_batched_tokens),
                  *(["--quantization", args.quantization] if args.quantization else []),
                  *(["--threads", str(args.shard_threads)] if args.shard_threads else []),
                  *(["--prefill-tokens-beside-decodes", str(args.prefill_beside_decodes)]
                    if args.prefill_beside_decodes else []),
                  *(["--cache", ""] if args.no_kv_sharing else []),
                  *(["--no-native-kernels"] if args.no_native_kernels else [])]
    shard_metrics, gateway_metrics = free_port(), free_port()
    plan = plan_mesh(str(args.model), 1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, shard_metrics],
                     gateway_metrics_port=gateway_metrics,
                     shard_args=shard_args, gateway_args=["--no-response-cache"])
    rows = []
    with Mesh(plan, log_dir=Path("/tmp/llmmesh-bench-logs")) as mesh:
        mesh.start()
        concurrency = [int(x) for x in args.concurrency.split(",")]
        # Warm up, and prefill every prompt once: each row (and each --sampling mode) then finds the
        # same prefix cache, instead of the first row paying for the prefills the later ones reuse.
        asyncio.run(drive(mesh.gateway_address, max(concurrency), args.rounds, 1))
        processes = dict(mesh.processes)  # the plan's: a second gateway's CPU is not theirs
        gateways = [("", mesh.gateway_address, gateway_metrics, processes)]
        if args.call_rows:
            address, metrics_port, process = second_gateway(mesh, ["--shard-streams", "call"])
            gateways.append((" (call per request)", address, metrics_port, {**processes, "gateway": process}))
        for i, n in enumerate(concurrency):
            for mode in args.sampling.split(","):
                # Which goes first alternates: on a shared machine, the load drifts within a row.
                for suffix, address, metrics_port, measured in gateways[::-1 if i % 2 else 1]:
                    before, cpu_before = scrape(metrics_port), outside_engine_cpu(measured)
                    row = asyncio.run(drive(address, n, args.rounds, args.max_tokens, mode))
                    row["name"] += suffix
                    row["messages_per_token"] = messages_per_token(before, scrape(metrics_port))
                    row.update(cpu_per_token(cpu_before, outside_engine_cpu(measured), row["tokens"]))
                    rows.append(row)
                    print(f"  measured {row['name']}: {row['tok_s']:.1f} tok/s", flush=True)
        choice_rows = [asyncio.run(drive_choices(mesh.gateway_address, shard_metrics, args.choices, args.max_tokens,
                                                 as_choices)) for as_choices in (True, False)] if args.choices else []

    if args.engine_rows:  # after the mesh is gone: the same cores, nothing else running
        for n in [int(x) for x in args.concurrency.split(",")]:
            rows.append(engine_row(args, n, args.rounds, args.max_tokens))
            mesh_row = next(r for r in rows if r["name"] == f"mesh N={n}")
            rows[-1]["mesh_over_engine"] = mesh_row["tok_s"] / rows[-1]["tok_s"]
            print(f"  measured {rows[-1]['name']}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)

    if not args.no_baselines:
        from services.tokenizer.text import Message, TextTokenizer

        tok = TextTokenizer(args.model)
        texts = make_prompts(args.baseline_n)
        prompts = [tok.encode_chat([Message("user", t)]) for t in texts]
        rows.extend(transformers_baselines(args.model, DTYPES[args.dtype], prompts, args.max_tokens,
                                           tok.eos_token_ids))
        llama = llama_cpp_baseline(args.model, texts, args.max_tokens)
        rows.append(llama or {"name": "llama-cpp-python (not installed)"})

    label = args.dtype + (f" + {args.quantization}" if args.quantization else "") + \
        f", {args.max_batched_tokens} tokens per step" + \
        (f" ({args.prefill_beside_decodes} prompt tokens beside decodes)" if args.prefill_beside_decodes else "") + \
        (", stock torch ops" if args.no_native_kernels else "")
    print(f"\nSmolLM2-135M-Instruct {label}, max {args.max_tokens} new tokens, {args.rounds} requests per "
          f"client; baselines: {args.baseline_n} requests arriving together\n")
    print(f"{'':30} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
          f" {'msgs/tok':>8} {'gw us/tok':>9} {'rest us/tok':>11}")
    for r in rows:
        if "tok_s" not in r:
            print(f"{r['name']:30}")
            continue
        if "ttft_p50" not in r:  # an in-process engine row
            print(f"{r['name']:30} {r['requests']:5d} {r['tokens']:7d} {r['tok_s']:8.1f}   "
                  f"(mesh/engine {r['mesh_over_engine']:.2f})")
            continue
        print(f"{r['name']:30} {r['requests']:5d} {r['tokens']:7d} {r['tok_s']:8.1f} {1000 * r['ttft_p50']:7.0f}ms "
              f"{1000 * r['ttft_p99']:7.0f}ms {1000 * r['itl_p50']:6.0f}ms {1000 * r['itl_p99']:6.0f}ms"
              + (f" {r['messages_per_token']:8.2f} {r['gateway_us_per_token']:9.0f} {r['others_us_per_token']:11.0f}"
                 if "messages_per_token" in r else ""))
    if choice_rows:
        block = 16  # the shard's default --block-size
        p = choice_rows[0]["prompt_tokens"]
        unshared = args.choices * -(-(p + args.max_tokens) // block)
        print(f"\n{args.choices} answers of {args.max_tokens} tokens (t=1.0) to one {p}-token prompt, all at once; "
              f"without shared prompt blocks they would take {unshared} KV blocks\n")
        print(f"{'':30} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'KV blocks':>10}")
        for r in choice_rows:
            print(f"{r['name']:30} {r['tokens']:7d} {r['tok_s']:8.1f} {1000 * r['ttft_p50']:7.0f}ms "
                  f"{1000 * r['ttft_p99']:7.0f}ms {r['kv_blocks']:10.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows + choice_rows, indent=2))


if __name__ == "__main__":
    main()
