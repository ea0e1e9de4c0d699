"""Scheduler and block pool without a model; the engine with the tiny Llama."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest
import torch

from services.model_shard.engine.async_engine import ENGINE_THREAD_NAME, AsyncEngine
from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.kv_blocks import BlockPool
from services.model_shard.engine.request import FinishReason, SamplingParams, Sequence
from services.model_shard.engine.scheduler import ModelRunnerOutput, QueueFullError, Scheduler, SchedulerConfig
from services.model_shard.model import native
from services.model_shard.model.llama import load_model

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 1, 200, 31], [7, 7, 7], [250, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17],
           [100], [33, 44, 55, 66]]


def test_block_pool_allocates_frees_and_refuses_when_full():
    pool = BlockPool(num_blocks=4, block_size=16)
    a = pool.allocate(3)
    assert len(a) == 3 and pool.num_free == 1
    assert pool.allocate(2) is None and pool.num_free == 1  # nothing taken on refusal
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.free(a[:1])


def test_retained_blocks_are_evicted_last_and_bounded():
    pool = BlockPool(num_blocks=6, block_size=16, max_retained=2)
    blocks = pool.allocate(6)
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]))
    conversation, other = blocks[:3], blocks[3:]
    pool.free(conversation, retain=True)  # three retained, over the bound of two: the oldest one goes back
    pool.free(other)
    assert pool.num_retained == 2 and pool.num_free == 6
    fresh = pool.allocate(4)  # the ordinary free blocks (and the one past the bound) are evicted first
    assert set(fresh) == set(other) | {conversation[2]}  # freed last-first: the tail was retained first
    assert pool.count_cached_prefix([bytes([0]), bytes([1])]) == 2  # the conversation's head survived
    assert pool.take_cached_prefix([bytes([0])]) == [conversation[0]] and pool.num_retained == 1
    assert pool.allocate(1) == [conversation[1]]  # nothing else is free: retained blocks go at last
    assert pool.count_cached_prefix([bytes([1])]) == 0


def _ran(tokens: list[int | None]) -> ModelRunnerOutput:
    return ModelRunnerOutput(tokens, [None] * len(tokens))


def _seq(rid: str, n: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), frozenset({0}))


def _sched(num_blocks: int, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=config.pop("max_model_len", 64), **config),
                     BlockPool(num_blocks, block_size))


def test_scheduler_grows_blocks_on_demand_and_bounds_the_queue():
    sched = _sched(4, max_waiting=2, enable_prefix_caching=False)
    sched.add(_seq("a", 4))
    sched.add(_seq("b", 4))
    with pytest.raises(QueueFullError):
        sched.add(_seq("c", 4))
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens, s.sample) for s in out.scheduled] == [("a", 4, True), ("b", 4, True)]
    assert sched.pool.num_free == 2  # one block each for now
    sched.update_from_output(out, _ran([9, 9]))
    out = sched.schedule()  # the fifth token of each needs a second block
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1] and sched.pool.num_free == 0


def test_scheduler_preempts_the_newest_when_blocks_run_out():
    sched = _sched(3, max_model_len=64, enable_prefix_caching=False)
    sched.add(_seq("old", 4, max_tokens=20))
    sched.add(_seq("new", 4, max_tokens=20))
    sched.update_from_output(sched.schedule(), _ran([9, 9]))  # 5 tokens each: 2 blocks + 1 block so far
    out = sched.schedule()  # "new" needs a second block: none free, so "new" itself yields
    assert [s.seq.request_id for s in out.scheduled] == ["old"] and out.num_preempted == 1
    assert [s.request_id for s in sched.waiting] == ["new"] and sched.waiting[0].num_computed_tokens == 0


def test_chunked_prefill_shares_the_step_budget_with_decodes():
    sched = _sched(16, max_batched_tokens=4, enable_prefix_caching=False)
    sched.add(_seq("short", 2))
    sched.update_from_output(sched.schedule(), _ran([7]))
    sched.add(_seq("long", 10))
    chunks = []
    for _ in range(4):
        out = sched.schedule()
        chunks.append([(s.seq.request_id, s.num_new_tokens, s.sample) for s in out.scheduled])
        sched.update_from_output(out, _ran([7 if s.sample else None for s in out.scheduled]))
    assert chunks == [
        [("short", 1, True), ("long", 3, False)],  # the decode first, the prompt takes what is left
        [("short", 1, True), ("long", 3, False)],
        [("short", 1, True), ("long", 3, False)],
        [("long", 1, True)],  # "short" finished at max_tokens=4; the prompt's last token samples
    ]


def test_prompt_chunks_beside_decodes_are_capped_and_a_lone_prompt_is_not():
    sched = _sched(32, max_batched_tokens=8, prefill_tokens_beside_decodes=2, enable_prefix_caching=False)
    sched.add(_seq("first", 11, max_tokens=3))
    sched.add(_seq("second", 9))
    steps = []
    while sched.has_work and len(steps) < 12:
        out = sched.schedule()
        steps.append([(s.seq.request_id, s.num_new_tokens) for s in out.scheduled])
        sched.update_from_output(out, _ran([7 if s.sample else None for s in out.scheduled]))
    assert steps == [
        [("first", 8)],  # nothing decodes yet: the whole budget goes to prompts
        [("first", 3), ("second", 5)],
        [("first", 1), ("second", 2)],  # "first" decodes: the other prompt gets 2 tokens a step
        [("first", 1), ("second", 2)],  # "first" has its 3 tokens; "second" its first
        [("second", 1)],
        [("second", 1)],
        [("second", 1)],
    ]


def test_prefix_blocks_are_shared_and_outlive_their_sequence():
    sched = _sched(8)
    shared = list(range(1, 13))  # three full blocks
    sched.add(Sequence("a", shared + [50, 51], SamplingParams(max_tokens=1), frozenset()))
    sched.update_from_output(sched.schedule(), _ran([9]))  # a finishes; its blocks are free but cached
    assert sched.pool.num_used == 0 and sched.pool.num_cached == 3
    b = Sequence("b", shared + [60], SamplingParams(max_tokens=2), frozenset())
    sched.add(b)
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 1 and b.num_cached_tokens == 12
    # A prompt that is all cached blocks still computes its last token.
    c = Sequence("c", shared, SamplingParams(max_tokens=2), frozenset())
    sched.add(c)
    assert sched.schedule().scheduled[-1].num_new_tokens == 4 and c.num_cached_tokens == 8


def test_scheduler_refuses_what_can_never_fit():
    sched = Scheduler(SchedulerConfig(max_model_len=32), BlockPool(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="context"):
        sched.add(_seq("long", 40))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(_seq("big", 10, max_tokens=10))  # 11 tokens need 3 blocks of 4


def test_finish_on_eos_and_length():
    pool = BlockPool(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(max_model_len=64), pool)
    sched.add(_seq("eos", 3, max_tokens=5))
    sched.add(_seq("len", 3, max_tokens=2))
    out = sched.schedule()
    sched.update_from_output(out, _ran([7, 7]))
    results = sched.update_from_output(sched.schedule(), _ran([0, 8]))
    assert {r.request_id: r.finish_reason for r in results} == {"eos": FinishReason.STOP, "len": FinishReason.LENGTH}
    assert pool.num_used == 0 and not sched.has_work


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return LLMEngine(load_model(tiny_model_dir), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))


def test_batched_greedy_equals_single_runs(tiny_engine):
    params = SamplingParams(max_tokens=16)
    singles = [tiny_engine.generate([p], params)[0] for p in PROMPTS]
    assert tiny_engine.generate(PROMPTS, params) == singles
    assert tiny_engine.pool.num_used == 0


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_batched_greedy_equals_single_runs(tiny_model_dir, quantization):
    """The quantized linears (native W4A8 / W8A8 kernels where they build) keep each row independent of the batch."""
    model = load_model(tiny_model_dir, torch.bfloat16, quantization)
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    assert engine.model.layers[0].mlp.down_proj.native is native.vnni_supported()
    params = SamplingParams(max_tokens=16)
    singles = [engine.generate([p], params)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS, params) == singles


def test_seeded_sampling_is_independent_of_the_batch(tiny_engine):
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i) for i in range(5)]
    singles = [tiny_engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params)]
    assert tiny_engine.generate(PROMPTS, params) == singles
    again = tiny_engine.generate(PROMPTS[:1], params[0])[0]
    assert again == singles[0]
    other_seed = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_tokens=16, temperature=0.9, seed=7))[0]
    assert other_seed != singles[0]


def test_requests_join_a_running_batch_mid_generation(tiny_engine):
    """Continuous batching: a request added while others decode gets the tokens it gets alone."""
    params = SamplingParams(max_tokens=12)
    expected = [tiny_engine.generate([p], params)[0] for p in PROMPTS[:3]]
    seqs = [tiny_engine.add_request("j0", PROMPTS[0], params)]
    for _ in range(3):
        tiny_engine.step()
    seqs.append(tiny_engine.add_request("j1", PROMPTS[1], params))
    tiny_engine.step()
    seqs.append(tiny_engine.add_request("j2", PROMPTS[2], params))
    while tiny_engine.has_work:
        tiny_engine.step()
    assert [s.output_token_ids for s in seqs] == expected


def test_cancelling_a_stream_frees_its_blocks(tiny_model_dir):
    engine = LLMEngine(load_model(tiny_model_dir), EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    async_engine = AsyncEngine(engine)

    async def scenario():
        got_first = asyncio.Event()

        async def consume():
            async for _ in async_engine.generate("c1", PROMPTS[0], SamplingParams(max_tokens=400)):
                got_first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_first.wait(), 30)
        assert engine.pool.num_used > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The abort is applied by the engine thread between steps; the barrier waits for that.
        await asyncio.wait_for(async_engine.sync(), 10)
        assert engine.pool.num_used == 0 and async_engine.num_requests == 0

    try:
        asyncio.run(scenario())
    finally:
        async_engine.stop()


def test_async_engine_reports_bad_requests(tiny_model_dir):
    async_engine = AsyncEngine(LLMEngine(load_model(tiny_model_dir), EngineConfig(max_model_len=64)))

    async def scenario():
        with pytest.raises(ValueError, match="vocabulary"):
            async for _ in async_engine.generate("bad", [999999], SamplingParams(max_tokens=2)):
                pass
        with pytest.raises(ValueError, match="context"):
            async for _ in async_engine.generate("long", [5] * 100, SamplingParams(max_tokens=2)):
                pass

    try:
        asyncio.run(scenario())
    finally:
        async_engine.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="OS thread names are read from /proc")
def test_the_engine_thread_is_named_in_the_os(tiny_model_dir):
    """The benches tell the engine's CPU from its serving threads' by this name (bench/mesh_metrics.py)."""
    async_engine = AsyncEngine(lambda: LLMEngine(load_model(tiny_model_dir), EngineConfig(max_model_len=64)))

    def name(tid: int) -> str:
        with open(f"/proc/{os.getpid()}/task/{tid}/comm") as f:
            return f.read().strip()

    try:
        assert name(async_engine._thread.native_id) == ENGINE_THREAD_NAME
        assert name(threading.main_thread().native_id) != ENGINE_THREAD_NAME
    finally:
        async_engine.stop()


def _engine(model_dir, **config) -> LLMEngine:
    return LLMEngine(load_model(model_dir), EngineConfig(**{"block_size": 4, "kv_cache_bytes": 1 << 20, **config}))


def test_chunked_prefill_gives_identical_tokens(tiny_model_dir):
    long_prompts = [list(range(3, 90)), list(range(100, 140)), [7, 7, 7]]
    params = SamplingParams(max_tokens=10)
    whole = _engine(tiny_model_dir, max_batched_tokens=4096, enable_prefix_caching=False)
    chunked = _engine(tiny_model_dir, max_batched_tokens=7, enable_prefix_caching=False)
    assert chunked.generate(long_prompts, params) == whole.generate(long_prompts, params)
    assert chunked.stats.steps > whole.stats.steps  # it really ran in chunks


def test_preemption_recomputes_to_identical_tokens(tiny_model_dir):
    params = [SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, temperature=1.0, seed=5)] * 3
    roomy = _engine(tiny_model_dir)
    tight = _engine(tiny_model_dir, kv_cache_bytes=roomy.executor.kv_cache_bytes_per_block * 14,
                    enable_prefix_caching=False)
    prompts = PROMPTS + [[9, 8, 7, 6, 5, 4, 3]]
    expected = roomy.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert tight.stats.preemptions > 0
    assert got == expected
    assert tight.pool.num_used == 0


def test_prefix_reuse_gives_identical_tokens_and_skips_prefill(tiny_model_dir):
    system = list(range(10, 74))  # 16 full blocks of 4
    questions = [system + [200, 201, 202], system + [210, 211], system + [220]]
    params = SamplingParams(max_tokens=8)
    cold = _engine(tiny_model_dir, enable_prefix_caching=False)
    expected = [cold.generate([q], params)[0] for q in questions]
    warm = _engine(tiny_model_dir)
    got = [warm.generate([q], params)[0] for q in questions]
    assert got == expected
    # The first question computes the shared prefix; the next two reuse its 64 tokens.
    assert cold.stats.computed_tokens - warm.stats.computed_tokens == 2 * len(system)
    assert warm.pool.stats.hit_tokens == 2 * len(system)


def test_logprobs_are_the_models_own(tiny_model_dir):
    from services.model_shard.model.evaluate import prompt_logits

    engine = _engine(tiny_model_dir)
    prompt = PROMPTS[2]
    for params in (SamplingParams(max_tokens=10, logprobs=True),
                   SamplingParams(max_tokens=10, temperature=1.0, seed=3, logprobs=True)):
        seq = engine.add_request(f"lp-{params.temperature}", prompt, params)
        reported = []
        while engine.has_work:
            for out in engine.step():
                reported.extend(out.new_logprobs)
        tokens = seq.output_token_ids
        full = prompt_logits(engine.model, prompt + tokens).log_softmax(-1)
        expected = [full[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]
        assert reported == pytest.approx(expected, abs=1e-4)
    seq = engine.add_request("no-lp", prompt, SamplingParams(max_tokens=3))
    outs = []
    while engine.has_work:
        outs.extend(engine.step())
    assert outs and all(o.new_logprobs is None for o in outs) and seq.finished


def test_a_resumed_request_continues_token_for_token_with_penalties_and_min_tokens(tiny_model_dir):
    """Failover resume sends prompt + delivered tokens with skip_draws: the delivered tokens still count as
    generated for OpenAI's penalties, and the gateway lowers min_tokens by them."""
    params = dict(temperature=0.9, seed=12, presence_penalty=1.5, frequency_penalty=0.8, min_tokens=10)
    whole = _engine(tiny_model_dir).generate([PROMPTS[0]], SamplingParams(max_tokens=16, **params))[0]
    delivered = whole[:6]
    resumed = _engine(tiny_model_dir).generate(
        [PROMPTS[0] + delivered],
        SamplingParams(max_tokens=10, skip_draws=6, **{**params, "min_tokens": 4}))[0]
    assert delivered + resumed == whole
