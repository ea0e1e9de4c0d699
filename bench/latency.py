"""One stream's latency through the mesh, beside the same model in-process.

Rows (same prompt, greedy, same token budget):
  mesh (gRPC)          : client -> gateway -> tokenizer/cache/shard, streamed
  engine (in-process)  : our LLMEngine stepped directly, no gRPC: the model's own speed
  transformers generate: LlamaForCausalLM.generate, what the model costs without us
  llama-cpp-python     : llama.cpp on the GGUF the model ships as (Q4_1), when installed

The mesh's and the engine's runs alternate (this machine's speed drifts more between minutes than
the mesh costs), and both print the inter-token p50 (ITL). TTFT is the time to the first token;
tokens/s counts completion tokens over the whole request; decode tok/s those after the first, over
the time after it. Below the table: the CPU each process spent per generated token outside the
engine during the mesh's runs, this client's included. On a machine whose cores the engine fills,
that CPU is what the mesh adds to each token. Also below: the mean engine step in the shard beside the
in-process one's; a longer step in the shard is the engine slowed by what shares its process and cores.

--engine-cores 0 gives the engine cores of its own (Linux): the shard's engine threads and the
in-process engine run there, with one torch thread per core; everything else (the rest of each mesh
process, this client) runs on the other cores. What the mesh then adds is not CPU taken from the model.

    .venv/bin/python bench/latency.py [--dtype auto] [--quantization auto] [--runs 5] [--engine-cores 0]
                                      [--json out.json]
    (make bench runs it with the defaults: the configuration `make run` serves)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from bench.mesh_metrics import ENGINE_THREAD_NAME, messages_per_token, outside_engine_cpu, scrape, threads  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402
from services.model_shard.engine.engine import DTYPES  # noqa: E402

QUESTION = "Write a short story about a robot who learns to paint."


class Run:
    """One request: when it started, and when its tokens arrived (several may come at once)."""

    def __init__(self) -> None:
        self.start, self.arrivals = time.perf_counter(), []  # (time, tokens that came then)

    def tokens(self, count: int) -> None:
        if count:
            self.arrivals.append((time.perf_counter(), count))

    def row(self) -> tuple[float, int, float, list[float]]:
        """(TTFT, tokens, seconds, inter-token gaps); tokens that came together share their gap."""
        gaps = []
        for (before, _), (now, count) in zip(self.arrivals, self.arrivals[1:]):
            gaps += [(now - before) / count] * count
        return (self.arrivals[0][0] - self.start, sum(count for _, count in self.arrivals),
                time.perf_counter() - self.start, gaps)


def mesh_run(stub, max_tokens: int):
    request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    run = Run()
    for chunk in stub.GenerateStream(request, timeout=300):
        run.tokens(len(chunk.token_ids))
    return run.row()


def engine_run(engine, prompt_ids: list[int], max_tokens: int, request_id: str, steps: list[float]):
    """One request on the in-process engine; each step's duration is added to steps."""
    from services.model_shard.engine.request import SamplingParams

    seq = engine.add_request(request_id, prompt_ids, SamplingParams(max_tokens=max_tokens))
    run, made = Run(), 0
    while engine.has_work:
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
        run.tokens(len(seq.output_token_ids) - made)
        made = len(seq.output_token_ids)
    return run.row()


def client_cpu() -> float:
    return time.process_time()  # this process: the client while the mesh runs, idle otherwise


class Placement:
    """--engine-cores: the engines' threads on those cores, every other thread of the mesh and of this
    process on the rest."""

    def __init__(self, engine_cores: set[int]):
        self.engine_cores, self.other_cores = engine_cores, os.sched_getaffinity(0) - engine_cores
        if not self.other_cores:
            raise SystemExit(f"--engine-cores {sorted(engine_cores)} leaves no core for the rest")

    def mesh(self, mesh: Mesh) -> None:
        for proc in mesh.processes.values():
            for tid, name in threads(proc.pid).items():
                os.sched_setaffinity(tid, self.engine_cores if name == ENGINE_THREAD_NAME else self.other_cores)

    def this_process(self, for_engine: bool) -> None:
        for tid in threads(os.getpid()):
            os.sched_setaffinity(tid, self.engine_cores if for_engine else self.other_cores)


def mesh_and_engine(args, stub, engine, prompt_ids: list[int], mesh: Mesh, metrics_ports: tuple[int, int],
                    placement: Placement | None) -> dict:
    """Alternating mesh and engine runs after one warm-up each: their rows, the mesh's internal messages
    per token, its CPU microseconds per token by process outside the engine (client included), and the
    mean engine step in the shard and in-process."""
    gateway_port, shard_port = metrics_ports
    mesh_run(stub, args.max_tokens)
    engine_run(engine, prompt_ids, args.max_tokens, "warm-up", [])
    if placement is not None:
        placement.mesh(mesh)
    out = {"mesh": [], "engine": [], "steps": []}
    spent: dict[str, float] = {}
    before, shard_before = scrape(gateway_port), scrape(shard_port)
    for i in range(args.runs):
        for which in ("mesh", "engine") if i % 2 == 0 else ("engine", "mesh"):
            if placement is not None:
                placement.this_process(for_engine=which == "engine")
            if which == "engine":
                out["engine"].append(engine_run(engine, prompt_ids, args.max_tokens, f"bench-{i}", out["steps"]))
                continue
            cpu = {**outside_engine_cpu(mesh.processes), "client": client_cpu()}
            out["mesh"].append(mesh_run(stub, args.max_tokens))
            after = {**outside_engine_cpu(mesh.processes), "client": client_cpu()}
            for name in after:
                spent[name] = spent.get(name, 0.0) + after[name] - cpu[name]
    tokens = sum(row[1] for row in out["mesh"])
    out["messages_per_token"] = messages_per_token(before, scrape(gateway_port))
    out["cpu"] = {name: 1e6 * seconds / tokens for name, seconds in spent.items()}
    shard_after = scrape(shard_port)
    shard = {name: shard_after[name] - shard_before[name]
             for name in ("llmmesh_step_duration_seconds_sum", "llmmesh_step_duration_seconds_count")}
    out["shard_step_ms"] = 1000 * shard["llmmesh_step_duration_seconds_sum"] / shard["llmmesh_step_duration_seconds_count"]
    out["engine_step_ms"] = 1000 * statistics.mean(out.pop("steps"))
    return out


def transformers_runs(model_dir: Path, prompt_ids: list[int], runs: int, max_tokens: int, eos: list[int],
                      dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.inference_mode():
        for _ in range(runs + 1):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=eos[0])
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            out.append((ttft, gen.shape[1] - ids.shape[1], time.perf_counter() - start))
    return out[1:]


def llama_cpp_runs(model_dir: Path, runs: int, max_tokens: int):
    """None when llama-cpp-python or a .gguf is missing (an optional bench extra)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    ggufs = sorted(model_dir.glob("*.gguf"))
    if not ggufs:
        return None
    llm = Llama(model_path=str(ggufs[0]), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    out = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        ttft, tokens = None, 0
        for chunk in llm.create_chat_completion([{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
                                                temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):  # the role and the finish come as chunks of their own
                ttft = ttft if ttft is not None else time.perf_counter() - start
                tokens += 1
        out.append((ttft, tokens, time.perf_counter() - start))
    return out[1:]


def summarize(name: str, rows) -> dict:
    out = {
        "name": name,
        "ttft_ms_p50": 1000 * statistics.median(r[0] for r in rows),
        "tokens": statistics.median(r[1] for r in rows),
        "tokens_per_s": statistics.median(r[1] / r[2] for r in rows),
        "decode_tokens_per_s": statistics.median((r[1] - 1) / (r[2] - r[0]) for r in rows),
        "e2e_ms_p50": 1000 * statistics.median(r[2] for r in rows),
    }
    gaps = [gap for r in rows if len(r) > 3 for gap in r[3]]  # the mesh's and the engine's rows have them
    if gaps:
        out["itl_ms_p50"] = 1000 * statistics.median(gaps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto (the default of make run): what model/precision.py chooses on this machine")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"])
    parser.add_argument("--engine-cores", help="comma-separated cores the engines run on alone (see above)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # Resolved here as the shard resolves them, so every row runs the same precision.
    from services.model_shard.model.precision import resolve_dtype, resolve_quantization

    chosen = " (auto)" if "auto" in (args.dtype, args.quantization) else ""
    args.dtype = resolve_dtype(args.dtype).value
    args.quantization = resolve_quantization(args.quantization, args.model, args.dtype, True).value
    shard_args = ["--dtype", args.dtype, "--quantization", args.quantization or "none"]

    from services.tokenizer.text import Message, TextTokenizer

    tok = TextTokenizer(args.model)
    prompt_ids = tok.encode_chat([Message("user", QUESTION)])

    placement = None
    if args.engine_cores:
        placement = Placement({int(core) for core in args.engine_cores.split(",")})
        torch.set_num_threads(len(placement.engine_cores))
        shard_args += ["--threads", str(len(placement.engine_cores))]
    from services.model_shard.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_dir(args.model, EngineConfig(dtype=args.dtype, quantization=args.quantization,
                                                         kv_cache_bytes=256 << 20))
    metrics_ports = (free_port(), free_port())
    ports = [free_port() for _ in range(4)]
    plan = plan_mesh(str(args.model), 1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, metrics_ports[1]],
                     gateway_metrics_port=metrics_ports[0], shard_args=shard_args, gateway_args=["--no-response-cache"])
    with Mesh(plan, log_dir=Path("/tmp/llmmesh-bench-logs")) as mesh:
        mesh.start()
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            measured = mesh_and_engine(args, gateway_pb2_grpc.GatewayStub(channel), engine, prompt_ids, mesh,
                                       metrics_ports, placement)
    if placement is not None:
        os.sched_setaffinity(0, placement.engine_cores | placement.other_cores)
    del engine
    per_token, cpu = measured["messages_per_token"], measured["cpu"]
    results = [summarize("mesh (gRPC, 4 services)", measured["mesh"]),
               summarize("engine (in-process)", measured["engine"])]
    results.append(summarize(f"transformers generate ({args.dtype})", transformers_runs(
        args.model, prompt_ids, args.runs, args.max_tokens, tok.eos_token_ids, DTYPES[args.dtype])))
    llama = llama_cpp_runs(args.model, args.runs, args.max_tokens)
    if llama is not None:
        results.append(summarize("llama-cpp-python (Q4_1 GGUF)", llama))

    label = args.dtype + (f" + {args.quantization}" if args.quantization else "") + chosen
    print(f"\nSmolLM2-135M-Instruct {label}, prompt {len(prompt_ids)} tokens, greedy, max {args.max_tokens} new "
          f"tokens, median of {args.runs} runs, {torch.get_num_threads()} torch threads\n")
    print(f"{'':34} {'TTFT ms':>9} {'ITL p50 ms':>11} {'tokens':>7} {'tok/s':>8} {'decode tok/s':>13} {'e2e ms':>9}")
    for r in results:
        itl = f"{r['itl_ms_p50']:11.2f}" if "itl_ms_p50" in r else f"{'':11}"
        print(f"{r['name']:34} {r['ttft_ms_p50']:9.1f} {itl} {r['tokens']:7.0f} {r['tokens_per_s']:8.1f} "
              f"{r['decode_tokens_per_s']:13.1f} {r['e2e_ms_p50']:9.1f}")
    mesh, engine = results[0], results[1]
    print(f"\nmesh vs the in-process engine: TTFT {mesh['ttft_ms_p50'] - engine['ttft_ms_p50']:+.1f} ms, "
          f"ITL p50 {mesh['itl_ms_p50'] - engine['itl_ms_p50']:+.2f} ms, "
          f"tokens/s ratio {mesh['tokens_per_s'] / engine['tokens_per_s']:.2f}; "
          f"gRPC messages between the gateway and its backends per generated token: {per_token:.2f}")
    print("CPU per generated token outside the engine, during the mesh's runs (us): "
          + ", ".join(f"{name.replace('shard-0', 'shard outside its engine')} {us:.0f}" for name, us in cpu.items())
          + f"; in all {sum(cpu.values()):.0f}")
    print(f"mean engine step during the runs: in the shard {measured['shard_step_ms']:.2f} ms, in-process "
          f"{measured['engine_step_ms']:.2f} ms"
          + (f"; engines on cores {sorted(placement.engine_cores)}, the rest on {sorted(placement.other_cores)}"
             if placement else ""))
    mesh["internal_messages_per_token"] = per_token
    mesh["cpu_us_per_token_outside_engine"] = cpu
    mesh["engine_step_ms"], engine["engine_step_ms"] = measured["shard_step_ms"], measured["engine_step_ms"]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
