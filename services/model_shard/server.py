"""gRPC front of a model shard: proto -> engine request -> stream of token ids."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter

import grpc
from opentelemetry import propagate, trace
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.common.block_hash import chain_block_hashes, index_key, scope_root
from services.common.errors import REQUEST_FAILED_KEY, retry_later
from services.common.telemetry import record_span, tracer
from services.common.labels import BoundedLabels
from services.model_shard.batch_stream import BatchStream, CallError
from services.model_shard.engine.async_engine import AsyncEngine, EngineDeadError, RequestClass, StepReport
from services.model_shard.engine.grammar import OutputSpec
from services.model_shard.engine.request import FinishReason, RequestFault, SamplingParams
from services.model_shard.engine.scheduler import QueueFullError
from services.model_shard.kv_share import KV_FETCHES_SKIPPED, SharedKvBlocks

log = logging.getLogger(__name__)

QUEUE_TIME = Histogram("llmmesh_queue_time_seconds", "Time from arrival at the shard to first scheduling",
                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
BATCH_SIZE = Histogram("llmmesh_batch_size", "Sequences in one engine step",
                       buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256))
STEP_TOKENS = Histogram("llmmesh_step_tokens", "Tokens computed in one engine step (prefill chunks + decodes)",
                        buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
TENANT_QUEUE_TIME = Histogram("llmmesh_tenant_queue_time_seconds", "Time from arrival at the shard to first "
                              "scheduling, by tenant", ["tenant"],
                              buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
TENANT_LABEL = BoundedLabels()
STEP_TIME = Histogram("llmmesh_step_duration_seconds", "Wall time of one engine step",
                      buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5))


def observe_step(report: StepReport) -> None:
    """AsyncEngine's on_step hook (engine thread; prometheus_client is thread-safe)."""
    BATCH_SIZE.observe(report.num_seqs)
    STEP_TOKENS.observe(report.num_tokens)
    STEP_TIME.observe(report.duration_s)


def sampling_from_proto(p, skip_draws: int = 0) -> SamplingParams:
    return SamplingParams(
        skip_draws=skip_draws,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p if 0 < p.top_p < 1 else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty or 1.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        min_tokens=p.min_tokens,
        ignore_eos=p.ignore_eos,
        stop_token_ids=tuple(p.stop_token_ids),
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        raw_logprobs=p.raw_logprobs,
        prompt_logprobs=p.prompt_logprobs,
        structured=structured_from_proto(p),
    )


def structured_from_proto(p) -> OutputSpec | None:
    kind = p.structured.WhichOneof("kind") if p.HasField("structured") else None
    if kind is None:
        return None
    if kind == "choice":
        return OutputSpec("choice", json.dumps(list(p.structured.choice.options)))
    if kind == "json_object":
        return OutputSpec("json_object", "")
    return OutputSpec(kind, getattr(p.structured, kind))


def _ready_matcher(grammars, spec: OutputSpec, delivered: list[int]):
    """A matcher with its first mask computed (that builds its lexer): the slow part of a grammar,
    done here rather than on the engine thread."""
    matcher = grammars.matcher(spec, delivered)
    matcher.compute_bitmask()
    return matcher


def top_logprobs_to_proto(tops) -> list[common_pb2.TopLogprobs]:
    return [common_pb2.TopLogprobs(token_ids=ids, logprobs=lps) for ids, lps in tops]


class PrefixIndexFeed:
    """Fans the engine's prefix-cache changes out to WatchPrefixIndex streams (event-loop thread)."""

    def __init__(self):
        self.subscribers: set[asyncio.Queue] = set()

    def publish(self, added: list[bytes], removed: list[bytes]) -> None:
        for queue in self.subscribers:
            queue.put_nowait((added, removed))


class ModelShardServicer(shard_pb2_grpc.ModelShardServicer):
    def __init__(self, engine: AsyncEngine, model_name: str, retry_after_s: float = 0.5,
                 shared_kv: SharedKvBlocks | None = None, prefix_feed: PrefixIndexFeed | None = None,
                 grammar_timeout_s: float = 10.0):
        """Health follows the engine through AsyncEngine's on_health hook, not this servicer."""
        self.engine = engine
        self.shared_kv = shared_kv
        self.retry_after_s = retry_after_s
        self.model_name = model_name
        self.grammar_timeout_s = grammar_timeout_s
        self.prefix_feed = prefix_feed or PrefixIndexFeed()  # fed by AsyncEngine's on_prefix_change
        self._calls: dict[str, set[str]] = {}  # a caller's request_id -> the engine ids of its running calls
        self.draining: asyncio.Event | None = None  # set by the server once it drains: batch streams end

    async def Generate(self, request: shard_pb2.ShardGenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for msg in self.responses(request):
                yield msg
        except CallError as err:
            await context.abort(err.code, err.details, err.trailing_metadata)

    async def GenerateBatch(self, requests, context: grpc.aio.ServicerContext):
        try:
            async for reply in BatchStream(self.responses, self.draining).run(requests):
                yield reply
        except CallError as err:
            await context.abort(err.code, err.details, err.trailing_metadata)

    async def responses(self, request: shard_pb2.ShardGenerateRequest):
        """One request's messages, as its Generate call streams them; CallError ends it with a status.
        Runs in the request's server span (record_span makes queue, prefill and decode its children)."""
        if not request.prompt_token_ids:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        if request.sampling.n > 1:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "a shard call makes one choice; send one call per "
                            "choice (the gateway does, and the shard shares their prompt's blocks)")
        # The engine knows this call by an id of its own: callers' ids are labels (Abort takes them).
        label, request_id = request.request_id, uuid.uuid4().hex
        params = sampling_from_proto(request.sampling, request.resume_draws)
        first, times, count, steps = True, None, 0, 0
        matcher = await self._matcher(params, list(request.prompt_token_ids))
        root = scope_root(request.cache_scope)
        if self.shared_kv is not None:
            await self._fetch_shared_prefix(list(request.prompt_token_ids), root)
        self._calls.setdefault(label, set()).add(request_id)
        try:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            request_class = RequestClass(request.tenant, request.priority, request.tenant_weight or 1.0,
                                         request.retain_blocks, root, request.answer_scope)
            async for batch in self.engine.generate(request_id, list(request.prompt_token_ids), params, carrier,
                                                    request_class, matcher):
                last = batch[-1]
                times = last.times
                if last.finish_reason is FinishReason.ABORTED:
                    raise CallError(grpc.StatusCode.CANCELLED, f"request {label} was aborted")
                if last.finish_reason is FinishReason.ERROR and isinstance(last.error, RequestFault):
                    raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(last.error))  # the request's own fault
                if last.finish_reason is FinishReason.ERROR:
                    # Tokens made before the failure are lost with the stream: the caller cannot
                    # resume it (the same request would fail again) and reports the error.
                    log.error("request %s (%s) failed in the engine: %s", label, request_id, last.error)
                    raise CallError(grpc.StatusCode.INTERNAL, f"the model shard could not compute this request: "
                                    f"{last.error}", ((REQUEST_FAILED_KEY, "1"),))
                tokens = [t for out in batch for t in out.new_token_ids]
                count += len(tokens)
                steps += len(batch)  # one output per engine step that sampled for this request
                msg = shard_pb2.ShardGenerateResponse(token_ids=tokens)
                if params.logprobs:
                    msg.logprobs.extend(lp for out in batch for lp in out.new_logprobs or ())
                if params.logprobs and params.top_logprobs:
                    msg.top_logprobs.extend(top_logprobs_to_proto(t for out in batch for t in out.new_top_logprobs or ()))
                if first:
                    first = False
                    self._first_message(msg, batch, request.tenant)
                if last.finished:
                    msg.finish_reason = last.finish_reason.value
                yield msg
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except QueueFullError as exc:
            raise CallError.of(retry_later(f"the shard's queue is full ({exc})", self.retry_after_s)) from None
        except EngineDeadError as exc:
            raise CallError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        finally:
            calls = self._calls.get(label)
            calls.discard(request_id)
            if not calls:
                del self._calls[label]
            if times is not None and times.first_token_ns is not None:
                record_span("decode", times.first_token_ns, times.finished_ns or times.first_token_ns,
                            {"llmmesh.completion_tokens": count, "llmmesh.decode_steps": max(steps - 1, 0),
                             # each step made one token and its accepted proposals
                             "llmmesh.speculative_accepted_tokens": count - steps})

    @staticmethod
    def _first_message(msg: shard_pb2.ShardGenerateResponse, batch, tenant: str) -> None:
        """The prompt's counts and log-probabilities on the first message; its queue and prefill spans."""
        last = batch[-1]
        times = last.times
        msg.prompt_tokens, msg.cached_tokens = last.prompt_tokens, last.cached_tokens
        msg.prompt_logprobs.extend(batch[0].prompt_logprobs or ())
        msg.prompt_top_logprobs.extend(top_logprobs_to_proto(batch[0].prompt_top_logprobs or ()))
        trace.get_current_span().add_event("first_token", timestamp=times.first_token_ns)
        record_span("queue", times.arrival_ns, times.scheduled_ns or times.arrival_ns)
        queued = ((times.scheduled_ns or times.arrival_ns) - times.arrival_ns) / 1e9
        QUEUE_TIME.observe(queued)
        TENANT_QUEUE_TIME.labels(TENANT_LABEL(tenant)).observe(queued)
        record_span("prefill", times.scheduled_ns or times.arrival_ns, times.first_token_ns or times.arrival_ns,
                    {"llmmesh.prompt_tokens": last.prompt_tokens, "llmmesh.cached_tokens": last.cached_tokens})

    async def _matcher(self, params: SamplingParams, prompt: list[int]):
        """The constrained request's matcher, made off the engine thread within --grammar-timeout."""
        if params.structured is None:
            return None
        engine = self.engine.engine
        if engine is None or engine.grammars is None:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "this shard serves no structured output "
                            "(its model directory has no tokenizer.json)")
        try:
            return await asyncio.wait_for(asyncio.to_thread(_ready_matcher, engine.grammars, params.structured,
                                                            params.delivered_tokens(prompt)), self.grammar_timeout_s)
        except TimeoutError:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"the {params.structured.kind} did not compile "
                            f"within {self.grammar_timeout_s:g}s (the shard's --grammar-timeout)") from None
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"structured output: {exc}") from None

    async def _fetch_shared_prefix(self, prompt: list[int], root: bytes) -> None:
        """Bring the prompt's leading blocks that this shard lacks from the cache service, so the
        engine prefills only the rest; root: its scope's (blocks of other scopes have other names).
        Failures are recorded on the span and otherwise ignored."""
        engine = self.engine.engine
        if engine is None or not engine.config.enable_prefix_caching or not engine.can_transfer_blocks:
            return
        config = engine.config
        # As the scheduler does: the last prompt token is always computed, its logits pick the next.
        hashes = chain_block_hashes(prompt, config.block_size, root=root)[: (len(prompt) - 1) // config.block_size]
        local = self.engine.cached_prefix_blocks(hashes)
        if local == len(hashes):
            return
        held = self.shared_kv.held_prefix(hashes[local:])
        if not held:  # no cache replica holds the next block: computing it is all there is to do
            KV_FETCHES_SKIPPED.inc()
            return
        with tracer("llmmesh").start_as_current_span("kv_fetch") as span:
            span.set_attribute("llmmesh.kv_blocks_local", local)
            span.set_attribute("llmmesh.kv_blocks_wanted", held)
            fetched = await self.shared_kv.fetch(hashes[local:local + held])
            span.set_attribute("llmmesh.kv_blocks_fetched", len(fetched.values))
            span.set_attribute("llmmesh.kv_bytes_fetched", fetched.bytes)
            if fetched.errors:
                span.set_attribute("llmmesh.kv_fetch_errors", fetched.errors)
            if not fetched.values:
                return
            try:
                cached = await self.engine.import_blocks(hashes[: local + len(fetched.values)],
                                                         [None] * local + fetched.values)
            except ValueError as exc:  # blocks of another size: a misconfigured layout, not this request's fault
                log.warning("shared KV blocks refused: %s", exc)
                span.set_attribute("llmmesh.kv_fetch_errors", [str(exc)])
                return
            span.set_attribute("llmmesh.kv_blocks_cached", cached)

    async def WatchPrefixIndex(self, request, context: grpc.aio.ServicerContext):
        queue: asyncio.Queue = asyncio.Queue()
        self.prefix_feed.subscribers.add(queue)  # before the snapshot: no change falls between
        try:
            snapshot = await self.engine.prefix_snapshot()
            block_size = self.engine.engine.config.block_size
            yield shard_pb2.PrefixIndexUpdate(reset=True, added=[index_key(h) for h in snapshot], block_size=block_size)
            while True:
                added, removed = await queue.get()
                yield shard_pb2.PrefixIndexUpdate(added=[index_key(h) for h in added],
                                                  removed=[index_key(h) for h in removed], block_size=block_size)
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            self.prefix_feed.subscribers.discard(queue)

    async def Abort(self, request: shard_pb2.AbortRequest, context):
        """Ends every running call sent with this request_id."""
        calls = self._calls.get(request.request_id, set())
        for request_id in calls:
            self.engine.abort(request_id)
        return shard_pb2.AbortReply(found=bool(calls))

    async def Info(self, request, context):
        e = self.engine.engine
        if e is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is being rebuilt")
        c = e.config
        places = await self.engine.worker_places()
        return shard_pb2.ShardInfo(
            model=self.model_name, max_model_len=e.max_model_len, block_size=c.block_size,
            num_blocks=e.pool.num_blocks, dtype=c.dtype, max_running=c.max_running,
            max_waiting=c.max_waiting, eos_token_ids=sorted(e.eos_token_ids),
            tensor_parallel_size=c.tensor_parallel_size, pipeline_parallel_size=c.pipeline_parallel_size,
            workers=[shard_pb2.ParallelWorker(rank=r, pid=pid, node=node) for r, (pid, node) in enumerate(places)],
        )


class EngineCollector(Collector):
    """Reads the engine's state at scrape time; the engine knows nothing of Prometheus."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        e = self.engine.engine
        if e is None:  # being rebuilt
            return
        yield GaugeMetricFamily("llmmesh_requests_running", "Requests in the running batch", value=len(e.scheduler.running))
        yield GaugeMetricFamily("llmmesh_requests_waiting", "Requests waiting to be scheduled", value=len(e.scheduler.waiting))
        yield GaugeMetricFamily("llmmesh_kv_blocks_used_ratio", "Share of KV blocks in use",
                                value=e.pool.num_used / e.pool.num_blocks)
        capacity = e.kv_capacity
        yield GaugeMetricFamily("llmmesh_kv_cache_blocks", "KV blocks the cache holds", value=capacity.blocks)
        yield GaugeMetricFamily("llmmesh_kv_cache_tokens", "Tokens the KV cache holds", value=capacity.tokens)
        yield GaugeMetricFamily("llmmesh_kv_cache_bytes_per_token", "KV cache bytes one token costs a worker, "
                                "all its layers' keys and values (int8 rows with their scales)",
                                value=capacity.bytes_per_token)
        info = InfoMetricFamily("llmmesh_kv_cache", "How the KV cache stores keys and values")
        info.add_metric([], {"dtype": e.kv_cache_dtype})
        yield info
        yield GaugeMetricFamily("llmmesh_kv_blocks_retained", "Free KV blocks of stored conversations' turns, "
                                "evicted after all other free blocks", value=e.pool.num_retained)
        # Hit rates as counters (queries, hits), so any window's ratio can be computed from rates.
        yield CounterMetricFamily("llmmesh_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=e.pool.stats.queried_tokens)
        yield CounterMetricFamily("llmmesh_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  value=e.pool.stats.hit_tokens)
        yield CounterMetricFamily("llmmesh_kv_blocks_allocated", "KV blocks handed out fresh (a shared block counts once)",
                                  value=e.pool.stats.allocated_blocks)
        yield CounterMetricFamily("llmmesh_preemptions", "Sequences preempted for lack of KV blocks",
                                  value=e.stats.preemptions)
        yield from tenant_metrics(e.scheduler)
        if e.scheduler.speculator is not None:
            yield from speculation_metrics(e.scheduler.speculator)


def speculation_metrics(speculator):
    """Proposed and accepted tokens by proposer, and the checks that made them: a check makes
    accepted + 1 tokens in one step, so acceptance is accepted / proposed and tokens per step
    (accepted + checks) / checks, over any window's rates."""
    families = [CounterMetricFamily(f"llmmesh_speculative_{name}", text, labels=["proposer"]) for name, text in (
        ("proposed_tokens", "Tokens proposed by speculative decoding and checked by the model"),
        ("accepted_tokens", "Proposed tokens the model accepted (each a token made without a step of its own)"),
        ("checks", "Sequence-steps that checked proposals"))]
    for proposer, stats in list(speculator.stats.items()):  # a copy: the engine thread adds proposers
        for family, value in zip(families, (stats.proposed, stats.accepted, stats.checks)):
            family.add_metric([proposer], value)
    yield from families


def tenant_metrics(scheduler):
    """Per tenant (bounded labels): sequences running and waiting, tokens computed, preemptions."""
    running = GaugeMetricFamily("llmmesh_tenant_requests_running", "Requests in the running batch, by tenant",
                                labels=["tenant"])
    waiting = GaugeMetricFamily("llmmesh_tenant_requests_waiting", "Requests waiting, by tenant", labels=["tenant"])
    tokens = CounterMetricFamily("llmmesh_tenant_computed_tokens", "Tokens computed (prompt and decode), by tenant",
                                 labels=["tenant"])
    preempted = CounterMetricFamily("llmmesh_tenant_preemptions", "Sequences preempted, by tenant", labels=["tenant"])
    # Copies taken in one C call each: the engine thread changes these between steps.
    for family, counts in ((running, Counter(s.tenant for s in list(scheduler.running))),
                           (waiting, Counter(s.tenant for s in list(scheduler.waiting))),
                           (tokens, scheduler.shares.tokens), (preempted, scheduler.shares.preemptions)):
        merged: Counter[str] = Counter()
        for tenant, n in list(counts.items()):
            merged[TENANT_LABEL(tenant)] += n
        for label, n in merged.items():
            family.add_metric([label], n)
        yield family
