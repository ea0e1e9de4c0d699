"""python -m services.model_shard --model PATH [--listen HOST:PORT] [--dtype auto|float32|bfloat16|float16]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import torch
from prometheus_client import REGISTRY

from llmmesh.v1 import cache_pb2_grpc, shard_pb2, shard_pb2_grpc
from services.common.channels import make_channel
from services.common.cli import add_service_args, env_default, instance_id, internal_token_from_args, tls_from_args
from services.common.hash_ring import HashRing
from services.common.logs import setup_logging
from services.common.server import ServeOptions, serve
from services.common.telemetry import setup_tracing
from services.model_shard.engine.async_engine import AsyncEngine
from services.model_shard.engine.engine import DTYPES, EngineConfig, ExecutorLost, LLMEngine
from services.model_shard.engine.fairness import POLICIES, FairnessConfig
from services.model_shard.engine.speculative import SpeculativeConfig
from services.model_shard.executor.ray_workers import connect_ray
from services.model_shard.kv_share import SharedKvBlocks
from services.model_shard.model.gguf_checkpoint import is_gguf, open_gguf
from services.model_shard.model.kv_format import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from services.model_shard.model.llama import LlamaConfig, UnsupportedModel, check_parallel
from services.model_shard.model.precision import resolve_dtype, resolve_quantization
from services.model_shard.server import EngineCollector, ModelShardServicer, PrefixIndexFeed, observe_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.model_shard", description="llm-mesh model shard")
    add_service_args(parser, "shard", "127.0.0.1:50061")
    parser.add_argument("--model", default=env_default("LLMMESH_MODEL", "models/SmolLM2-135M-Instruct"))
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default=env_default("LLMMESH_DTYPE", "auto"),
                        help="auto: bfloat16 where the hardware computes it natively, else float32 (model/precision.py)")
    parser.add_argument("--quantization", choices=["auto", "none", "int8", "int4"],
                        default=env_default("LLMMESH_QUANTIZATION", "auto"),
                        help="int8 (per channel) or int4 (groups of 32) linear weights; with the native kernels the "
                             "activations go to int8 per group of 32 too (llama.cpp's scheme). auto: the precision "
                             "the checkpoint was published in, where a native kernel runs it here; else none")
    parser.add_argument("--kv-cache-mb", type=int, default=int(env_default("LLMMESH_KV_CACHE_MB", "1024")),
                        help="memory for the paged KV cache")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=env_default("LLMMESH_KV_CACHE_DTYPE", "auto"),
                        help="how the KV cache stores keys and values: auto (the model's dtype), bfloat16 or float32 "
                             "(which must be --dtype), or int8 with a scale per token and KV head: 1.94x the tokens "
                             "in --kv-cache-mb (model/kv_format.py)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=int(env_default("LLMMESH_MAX_MODEL_LEN", "8192")))
    parser.add_argument("--max-running", type=int, default=64, help="sequences in one batch at most")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batched-tokens", type=int, default=512,
                        help="tokens per engine step; longer prompts are prefilled in chunks")
    parser.add_argument("--prefill-tokens-beside-decodes", type=int, default=None,
                        help="prompt tokens a step may carry while streams are decoding (default: what "
                             "--max-batched-tokens leaves); smaller keeps inter-token latency, costs TTFT")
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    parser.add_argument("--scheduling", choices=POLICIES, default=env_default("LLMMESH_SCHEDULING", "fair"),
                        help="fair: priority classes first, then tenants share by weight (engine/fairness.py); "
                             "fcfs: arrival order")
    parser.add_argument("--priority-aging-steps", type=int, default=2000,
                        help="a waiting request rises one priority class per this many engine steps")
    parser.add_argument("--max-priority-preemptions", type=int, default=2,
                        help="running sequences one step may preempt for a higher class or an under-served tenant")
    parser.add_argument("--cache", default=env_default("LLMMESH_CACHE_ADDR", ""),
                        help="cache service replicas (HOST:PORT, comma-separated) that share KV prefix blocks "
                             "between shards; empty for none")
    parser.add_argument("--kv-fetch-timeout", type=float, default=0.5,
                        help="seconds a prompt waits for shared KV blocks before computing them itself")
    parser.add_argument("--retry-after", type=float, default=0.5, help="seconds a refused client is told to wait")
    parser.add_argument("--grammar-timeout", type=float, default=10.0,
                        help="seconds a structured-output request's grammar may take to compile; past it the "
                             "request is refused and the shard serves on")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--tensor-parallel-size", type=int, default=int(env_default("LLMMESH_TENSOR_PARALLEL_SIZE", "1")),
                        help="split each layer's heads and MLP over this many Ray workers")
    parser.add_argument("--pipeline-parallel-size", type=int,
                        default=int(env_default("LLMMESH_PIPELINE_PARALLEL_SIZE", "1")),
                        help="split the layers into this many stages, one Ray worker group each")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch threads of each parallel worker")
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"],
                        default=env_default("LLMMESH_PLACEMENT_STRATEGY", "PACK"),
                        help="how Ray places the parallel workers: PACK on as few nodes as fit, SPREAD / "
                             "STRICT_SPREAD over several nodes (a shard that spans hosts)")
    parser.add_argument("--placement-timeout", type=float, default=60.0,
                        help="seconds one try to place the parallel workers waits for the Ray cluster; a rebuild "
                             "after a node was lost tries again until the workers fit")
    parser.add_argument("--no-native-kernels", action="store_true",
                        help="attention, norms, RoPE, SiLU and the int8/int4 linears on stock torch ops "
                             "instead of the native kernels (model/native.py)")
    add_speculative_args(parser)
    args = parser.parse_args(argv)
    speculative = speculative_config(parser, args)
    setup_logging("shard", args.log_level, args.log_format)
    log = logging.getLogger(__name__)
    setup_tracing("model_shard", instance_id(args.listen))
    token = internal_token_from_args(parser, args)
    served_name = Path(args.model).stem if is_gguf(args.model) else args.model.rstrip("/").rsplit("/", 1)[-1]
    if is_gguf(args.model):  # converted once into a checkpoint folder beside it (model/gguf_checkpoint.py)
        try:
            args.model = str(open_gguf(args.model))
        except (UnsupportedModel, OSError) as exc:
            log.critical("cannot serve %s: %s", args.model, exc)
            parser.error(f"cannot serve {args.model}: {exc}")
    dtype = resolve_dtype(args.dtype)
    quantization = resolve_quantization(args.quantization, args.model, dtype.value, not args.no_native_kernels)
    refusal = unsupported_model(args.model, quantization.value)
    if refusal:  # before anything starts: an architecture or config field the decoder does not implement
        log.critical("cannot serve %s: %s", args.model, refusal)
        parser.error(f"cannot serve {args.model}: {refusal}")
    log.info("dtype %s: %s", dtype.value, dtype.reason)
    log.info("quantization %s: %s", quantization.value or "none", quantization.reason)
    args.dtype, args.quantization = dtype.value, quantization.value
    try:
        kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    log.info("KV cache dtype %s: %s", kv_dtype.value, kv_dtype.reason)
    config = EngineConfig(
        dtype=args.dtype, quantization=args.quantization, block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_mb << 20, max_model_len=args.max_model_len, max_running=args.max_running,
        max_waiting=args.max_waiting, max_batched_tokens=args.max_batched_tokens,
        prefill_tokens_beside_decodes=args.prefill_tokens_beside_decodes,
        enable_prefix_caching=not args.no_prefix_caching,
        fairness=FairnessConfig(args.scheduling, args.priority_aging_steps, args.max_priority_preemptions),
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        threads_per_worker=args.threads_per_worker, placement_strategy=args.placement_strategy,
        placement_timeout_s=args.placement_timeout,
        native_kernels=not args.no_native_kernels, speculative=speculative, kv_cache_dtype=kv_dtype.value,
    )
    if config.parallel:  # a split the model cannot take is refused here, before anything starts
        try:
            check_parallel(LlamaConfig.from_dir(args.model), args.tensor_parallel_size, args.pipeline_parallel_size)
        except (ValueError, OSError) as exc:
            parser.error(str(exc))

    runtime_ref = {}
    shared_ref: dict[str, SharedKvBlocks] = {}

    def offer_blocks(hashes, data, retain) -> None:  # engine thread -> the uploader on the event loop
        shared, loop = shared_ref.get("shared"), runtime_ref.get("loop")
        if shared is not None and not loop.is_closed():
            loop.call_soon_threadsafe(shared.offer, hashes, data, retain)

    def build_engine() -> LLMEngine:  # runs on the engine thread (first build and rebuilds)
        if args.threads:
            torch.set_num_threads(args.threads)
        built = LLMEngine.from_dir(args.model, config)
        built.prompt_block_listener = offer_blocks
        return built

    if config.parallel:
        connect_ray(config.tensor_parallel_size * config.pipeline_parallel_size)  # main thread: see connect_ray

    def on_health(serving: bool) -> None:  # engine thread: a parallel worker died, or was rebuilt
        runtime, loop = runtime_ref.get("runtime"), runtime_ref.get("loop")
        if runtime is not None and not runtime.stopping.is_set():
            asyncio.run_coroutine_threadsafe(runtime.set_serving(serving), loop)

    def on_fatal(exc: BaseException) -> None:  # engine thread: nothing can be served any more
        runtime, loop = runtime_ref.get("runtime"), runtime_ref.get("loop")
        runtime_ref["exit_code"] = 1
        if runtime is not None and not loop.is_closed():
            loop.call_soon_threadsafe(runtime.stopping.set)  # drain what is left, then exit non-zero

    prefix_feed = PrefixIndexFeed()

    def on_prefix_change(added, removed) -> None:  # engine thread -> the index streams
        loop = runtime_ref.get("loop")
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(prefix_feed.publish, added, removed)

    engine = AsyncEngine(build_engine, on_step=observe_step, recover_from=(ExecutorLost,), on_health=on_health,
                         on_prefix_change=on_prefix_change, on_fatal=on_fatal)
    REGISTRY.register(EngineCollector(engine))

    async def on_start(runtime):
        runtime_ref["runtime"], runtime_ref["loop"] = runtime, asyncio.get_running_loop()
        servicer.draining = runtime.stopping  # batch streams end once their requests have
        caches = [a.strip() for a in args.cache.split(",") if a.strip()]
        if caches and config.enable_prefix_caching and engine.engine.can_transfer_blocks:
            tls = tls_from_args(args)
            channels = {a: make_channel(a, tls, token) for a in caches}
            ring = HashRing({a: cache_pb2_grpc.CacheStub(ch) for a, ch in channels.items()})
            shared = SharedKvBlocks(ring, engine.engine.kv_layout, fetch_timeout_s=args.kv_fetch_timeout,
                                    channels=list(channels.values()))
            shared.start()
            servicer.shared_kv = shared_ref["shared"] = shared

    servicer = ModelShardServicer(engine, model_name=served_name,
                                  retry_after_s=args.retry_after, prefix_feed=prefix_feed,
                                  grammar_timeout_s=args.grammar_timeout)

    def register(server):
        shard_pb2_grpc.add_ModelShardServicer_to_server(servicer, server)
        return [shard_pb2.DESCRIPTOR.services_by_name["ModelShard"].full_name]

    async def on_stop():
        engine.stop()
        if engine.engine is not None:
            engine.engine.shutdown()
        if servicer.shared_kv is not None:
            await servicer.shared_kv.stop()

    asyncio.run(serve(ServeOptions("model_shard", args.listen, args.metrics_port, args.grace, tls_from_args(args),
                                   args.tls_client_auth, internal_token=token), register,
                      on_start=on_start, on_stop=on_stop))
    if runtime_ref.get("exit_code"):
        log.critical("the engine failed for good; exiting so that the shard is restarted")
        sys.exit(runtime_ref["exit_code"])


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative", default=env_default("LLMMESH_SPECULATIVE", "off"),
                        help="speculative decoding, checked in the batch and exact (engine/speculative.py): off; "
                             "ngram (prompt lookup in the request's own context); suffix (that, and earlier answers "
                             "in the request's response-cache scope); auto (suffix)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="most tokens proposed per step")
    parser.add_argument("--speculative-max-decoding", type=int, default=4,
                        help="speculate only while at most this many sequences decode in a step (beyond, a step "
                             "is compute-bound and checked positions cost time)")
    parser.add_argument("--speculative-answer-tokens", type=int, default=200_000,
                        help="suffix: tokens of earlier answers kept for proposals, least recently used evicted")


def speculative_config(parser: argparse.ArgumentParser, args) -> SpeculativeConfig:
    """The --speculative* flags as a config; a method or size the engine cannot run is refused here."""
    if args.speculative.startswith("draft:"):
        parser.error("--speculative draft:PATH: a draft model is not implemented; use ngram, suffix or auto, "
                     "which need no second model")
    config = SpeculativeConfig(method=args.speculative, num_tokens=args.num_speculative_tokens,
                               max_decoding=args.speculative_max_decoding,
                               answer_store_tokens=args.speculative_answer_tokens)
    try:
        config.validate()
    except ValueError as exc:
        parser.error(f"--speculative: {exc}")
    return config


def unsupported_model(model_dir: str, quantization: str | None) -> str | None:
    """Why the model in model_dir cannot be served (families/ names the architecture or config
    field, and what is supported), or None. A missing folder is left to the engine's start."""
    try:
        cfg = LlamaConfig.from_dir(model_dir)
    except OSError:
        return None
    except (UnsupportedModel, ValueError, KeyError) as exc:
        return str(exc) if not isinstance(exc, KeyError) else f"config.json lacks the field {exc}"
    if cfg.num_experts and quantization:
        return f"{cfg.architecture}: {quantization} quantization of experts is not implemented; use --quantization none"
    return None


if __name__ == "__main__":
    main()
