"""The engine: a scheduler and an executor, stepped one batch at a time."""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.block_hash import ROOT
from services.model_shard.engine.fairness import FairnessConfig
from services.model_shard.engine.grammar import Grammars, Matchers
from services.model_shard.engine.kv_blocks import BlockPool
from services.model_shard.engine.request import RequestOutput, SamplingParams, Sequence
from services.model_shard.engine.sampler import seed_as_int64
from services.model_shard.engine.scheduler import Scheduler, SchedulerConfig
from services.model_shard.engine.speculative import SpeculativeConfig, Speculator
from services.model_shard.executor.local import LocalExecutor, kv_cache_bytes_per_block
from services.model_shard.model.kv_format import resolve_kv_cache_dtype
from services.model_shard.model.llama import (LlamaConfig, LlamaForServing, check_parallel, load_model,
                                              weights_fingerprint)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_FAILED_STEPS = 8  # consecutive failed steps after which the engine counts as broken


class ExecutorLost(RuntimeError):
    """The executor cannot run another step (e.g. a parallel worker died): rebuild the engine."""


class EngineBroken(RuntimeError):
    """Steps keep failing whatever they carry: the engine cannot go on."""


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"
    quantization: str | None = None  # "int8" | "int4": weight-only linears (pair with bfloat16)
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # None: the model's own limit
    max_running: int = 64
    max_waiting: int = 256
    max_batched_tokens: int = 512
    prefill_tokens_beside_decodes: int | None = None  # see SchedulerConfig
    enable_prefix_caching: bool = True
    fairness: FairnessConfig = FairnessConfig()  # priority classes and tenants' shares (fairness.py)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    threads_per_worker: int = 1  # torch threads of each parallel worker process
    # Ray placement of the workers: PACK (as few nodes as fit), SPREAD, STRICT_SPREAD (one node per
    # worker) or STRICT_PACK (one node).
    placement_strategy: str = "PACK"
    placement_timeout_s: float = 60.0  # how long one try to place the parallel workers may wait
    native_kernels: bool = True  # the native kernels where they build and the CPU has them (model/native.py)
    speculative: SpeculativeConfig = SpeculativeConfig()  # proposals checked in the batch (speculative.py)
    kv_cache_dtype: str = "auto"  # auto (dtype's), bfloat16, float32 or int8 (model/kv_format.py)

    @property
    def parallel(self) -> bool:
        return self.tensor_parallel_size * self.pipeline_parallel_size > 1


@dataclass(frozen=True)
class KvCapacity:
    """What the KV cache holds: its blocks, their tokens, and what a token costs a worker."""

    blocks: int
    block_size: int
    bytes_per_token: int

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size


@dataclass
class EngineStats:
    steps: int = 0
    computed_tokens: int = 0  # tokens run through the model (prefill chunks and decodes)
    scheduled_seqs: int = 0  # sequences summed over steps (over steps: the mean batch size)
    preemptions: int = 0


# Called on the engine thread with the hashes of newly computed prompt blocks and a copy of their
# KV bytes (uint8 [n, bytes per block]): the hook that lets a shared cache learn them.
# (hashes, data: uint8 [n, bytes per block], retain: which are a stored conversation's)
PromptBlockListener = Callable[[list[bytes], torch.Tensor, list[bool]], None]


class LLMEngine:
    def __init__(self, model: LlamaForServing | LlamaConfig, config: EngineConfig, model_id: str = "unnamed",
                 executor_factory: Callable[[int], object] | None = None):
        """model: the loaded model, run here; or only its config, with executor_factory(num_blocks)
        building the executor whose workers hold the weights (tensor/pipeline parallel, see
        executor/ray_workers.py). model_id names the weights (weights_fingerprint): part of kv_layout."""
        cfg = model.cfg if isinstance(model, LlamaForServing) else model
        self.model = model if isinstance(model, LlamaForServing) else None
        self.model_config = cfg
        self.config = config
        self.prompt_block_listener: PromptBlockListener | None = None
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        check_parallel(cfg, tp, pp)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, config.dtype).value
        storage = "int8" if self.kv_cache_dtype == "int8" else "auto"
        per_block = kv_cache_bytes_per_block(cfg, config.block_size, DTYPES[config.dtype], tp, pp, storage)
        num_blocks = config.kv_cache_bytes // per_block  # the budget is per worker
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {config.block_size} tokens")
        self.pool = BlockPool(num_blocks, config.block_size)
        self.matchers = Matchers(cfg.vocab_size)
        self.grammars: Grammars | None = None  # set by enable_grammars: constrained decoding (grammar.py)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_model_len=self.max_model_len,
                max_running=config.max_running,
                max_waiting=config.max_waiting,
                max_batched_tokens=config.max_batched_tokens,
                prefill_tokens_beside_decodes=config.prefill_tokens_beside_decodes,
                enable_prefix_caching=config.enable_prefix_caching,
                fairness=config.fairness,
            ),
            self.pool,
            self.matchers,
            Speculator(config.speculative) if config.speculative.method != "off" else None,
        )
        if executor_factory is not None:
            self.executor = executor_factory(num_blocks)
        else:
            self.executor = LocalExecutor(model, num_blocks, config.block_size, storage)
        self.eos_token_ids = frozenset(cfg.eos_token_ids)
        self.stats = EngineStats()
        self.failed_steps = 0  # consecutive
        # Everything that decides a KV block's bytes: blocks are shared only between equal layouts.
        self.kv_layout = (f"{model_id}/{config.dtype}/{config.quantization or 'none'}/b{config.block_size}"
                          f"/l{cfg.num_layers}h{cfg.num_kv_heads}d{cfg.head_dim}/tp{tp}pp{pp}/kv1-{self.kv_cache_dtype}")
        self.kv_capacity = KvCapacity(num_blocks, config.block_size, per_block // config.block_size)
        log.info("engine ready: %d KV blocks of %d tokens (%d tokens, %s KV, %d bytes per token per worker), "
                 "context %d, tensor x pipeline parallel %d x %d", num_blocks, config.block_size,
                 self.kv_capacity.tokens, self.kv_cache_dtype, self.kv_capacity.bytes_per_token, self.max_model_len, tp, pp)

    def enable_grammars(self, tokenizer_dir: str | Path) -> None:
        """Serve structured output with the tokenizer in tokenizer_dir (its tokenizer.json)."""
        self.grammars = Grammars.from_model_dir(tokenizer_dir, self.model_config.vocab_size,
                                                sorted(self.eos_token_ids))

    @property
    def can_transfer_blocks(self) -> bool:
        """Whether KV blocks can be exported and imported (shared through the cache service)."""
        return hasattr(self.executor, "export_blocks")

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: EngineConfig) -> "LLMEngine":
        model_id = f"{Path(model_dir).name}-{weights_fingerprint(model_dir)}"
        if config.parallel:
            from services.model_shard.executor.ray_workers import RayExecutor

            def workers(num_blocks: int):
                return RayExecutor(model_dir, config, num_blocks)

            engine = cls(LlamaConfig.from_dir(model_dir), config, model_id, executor_factory=workers)
        else:
            model = load_model(model_dir, DTYPES[config.dtype], config.quantization,
                               native_kernels=config.native_kernels)
            engine = cls(model, config, model_id)
        if (Path(model_dir) / "tokenizer.json").exists():
            engine.enable_grammars(model_dir)
        return engine

    def worker_places(self) -> list[tuple[int, str]]:
        places = getattr(self.executor, "worker_places", None)
        return places() if places is not None else []

    def shutdown(self) -> None:
        """Release the executor's workers, if it has any."""
        shutdown = getattr(self.executor, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def import_blocks(self, block_hashes: list[bytes], values: list[bytes | None]) -> int:
        """Adopt KV blocks computed elsewhere (same kv_layout) into the prefix cache, as free cached
        blocks a request can take. block_hashes is a prompt's chain from its first block; values[i]
        may be None where the caller expects block i to be held here already. Stops at a gap or when
        the pool has no free block; returns how many leading blocks are cached now."""
        if not self.config.enable_prefix_caching or not self.can_transfer_blocks:
            return 0
        size = self.executor.kv_cache_bytes_per_block
        bad = next((len(v) for v in values if v is not None and len(v) != size), None)
        if bad is not None:
            raise ValueError(f"a KV block of {bad} bytes; this layout's blocks are {size}")
        pinned = self.pool.take_cached_prefix(block_hashes, record_stats=False)  # not evicted below
        held = len(pinned)
        todo = list(itertools.takewhile(lambda item: item[1] is not None, zip(block_hashes[held:], values[held:])))
        blocks = self.pool.allocate(min(len(todo), self.pool.num_free)) or []
        todo = todo[: len(blocks)]
        try:
            if blocks:
                self.executor.import_blocks(blocks, [v for _, v in todo])
                for block, (h, _) in zip(blocks, todo):
                    self.pool.register(block, h)
        finally:
            self.pool.free(pinned + blocks)  # cached and free again; the chain's tail is evicted first
        return held + len(blocks)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    trace_carrier: dict[str, str] | None = None, tenant: str = "", priority: int = 0,
                    weight: float = 1.0, matcher=None, retain_blocks: bool = False,
                    cache_root: bytes = ROOT, answer_scope: bytes = b"") -> Sequence:
        """trace_carrier: the request's W3C trace context, for spans recorded by parallel workers.
        tenant, priority (0 goes first) and the tenant's weight decide its place (fairness.py).
        matcher: for params.structured, one made by self.grammars (made here when not given).
        retain_blocks: its KV blocks are evicted after all others once it ends (kv_blocks.py).
        cache_root: its prefix-cache scope's root (block_hash.scope_root): it reuses only blocks computed
        in that scope. answer_scope: speculation proposes it only answers given in that scope."""
        params.validate()
        if priority < 0 or not 0 < weight < math.inf:
            raise ValueError(f"priority must be >= 0 and weight a finite number > 0, got {priority} and {weight}")
        vocab = self.model_config.vocab_size
        for what, ids in (("prompt", prompt_token_ids), ("logit_bias", [t for t, _ in params.logit_bias]),
                          ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"{what}: token id {bad} is outside the vocabulary (size {vocab})")
        seed = params.seed if params.seed is not None else random.getrandbits(64)
        seq = Sequence(request_id, list(prompt_token_ids), params, self.eos_token_ids, seed_as_int64(seed),
                       trace_carrier=trace_carrier, tenant=tenant, priority=priority, weight=weight,
                       retain_blocks=retain_blocks, cache_root=cache_root, answer_scope=answer_scope)
        if params.structured is not None:
            if matcher is None:
                if self.grammars is None:
                    raise ValueError("this shard serves no structured output (its model has no tokenizer.json)")
                matcher = self.grammars.matcher(params.structured, params.delivered_tokens(prompt_token_ids))
            self.matchers.add(seq, matcher)
        try:
            self.scheduler.add(seq)
        except BaseException:
            self.matchers.release(seq)
            raise
        return seq

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """One batch through the model. A step that raises ends the requests it carried with
        FinishReason.ERROR and the engine goes on; ExecutorLost, and MAX_FAILED_STEPS failures in a
        row, propagate (the engine must be rebuilt, or the process restarted)."""
        out = self.scheduler.schedule()
        constrained = [item for item in out.scheduled if item.sample and item.seq.params.structured is not None]
        plain = [item for item in constrained if not item.draft]
        if plain:
            for item, mask in zip(plain, self.matchers.masks([item.seq for item in plain])):
                item.token_mask = mask
        for item in constrained:  # a drafted one's mask is a list: one per checked position
            if item.draft:
                item.token_mask = self.matchers.draft_masks(item.seq, item.draft)
        try:
            sampled = self.executor.execute(out)
        except ExecutorLost:
            raise
        except Exception as exc:
            self.failed_steps += 1
            if self.failed_steps >= MAX_FAILED_STEPS:
                raise EngineBroken(f"{self.failed_steps} steps in a row failed; the last: {exc!r}") from exc
            ids = [item.seq.request_id for item in out.scheduled]
            log.exception("an engine step failed; ending its %d requests: %s", len(ids), ", ".join(ids))
            return self.scheduler.fail(out, f"the engine step failed: {type(exc).__name__}: {exc}")
        self.failed_steps = 0
        self.stats.steps += 1
        self.stats.computed_tokens += out.num_tokens
        self.stats.scheduled_seqs += len(out.scheduled)
        self.stats.preemptions += out.num_preempted
        outputs = self.scheduler.update_from_output(out, sampled)
        new_blocks = self.scheduler.take_new_prompt_blocks()
        if new_blocks and self.prompt_block_listener is not None and self.can_transfer_blocks:
            ids, hashes, retain = zip(*new_blocks)
            self.prompt_block_listener(list(hashes), self.executor.export_blocks(list(ids)), list(retain))
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together (offline use and tests)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(f"offline-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        while self.has_work:
            self.step()
        return [s.output_token_ids for s in seqs]
