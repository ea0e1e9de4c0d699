"""The engine under odd values and failures: seeded draws independent of the batch, extreme
sampling parameters beside normal requests, a failing step or row ending only its requests, and an
engine that cannot go on telling its owner."""

from __future__ import annotations

import asyncio
import threading

import pytest
from services.model_shard.engine import engine as engine_module
from services.model_shard.engine.async_engine import AsyncEngine, EngineDeadError
from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import FinishReason, SamplingParams
from services.model_shard.executor import local
from services.model_shard.model.llama import load_model

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 1, 200, 31], [7, 7, 7], [250, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14],
           [100], [33, 44, 55, 66]]
EXTREMES = [dict(temperature=1e-45), dict(temperature=1e-40, top_p=1e-45), dict(temperature=100.0, top_k=2**32 - 1),
            dict(temperature=1.0, repetition_penalty=1e-45), dict(temperature=0.0, repetition_penalty=10.0),
            dict(temperature=1.0, min_p=1.0), dict(temperature=3e38, top_p=1.0, seed=2**64 - 1)]


def _engine(model_dir, **config) -> LLMEngine:
    return LLMEngine(load_model(model_dir), EngineConfig(**{"block_size": 4, "kv_cache_bytes": 1 << 20, **config}))


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    seqs = {rid: engine.add_request(rid, prompt, params) for rid, (prompt, params) in requests.items()}
    while engine.has_work:
        engine.step()
    return seqs


def _mixed(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=12, seed=500 + i, temperature=(0.0, 0.3, 0.9, 1.5)[i % 4],
                          top_k=(0, 3, 40)[i % 3], top_p=(1.0, 0.9, 0.6, 0.99)[i % 4], min_p=(0.0, 0.05)[i % 2],
                          repetition_penalty=(1.0, 1.2, 0.9)[i % 3])


def test_seeded_requests_are_identical_alone_and_in_a_batch_of_32_with_mixed_parameters(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    requests = {f"r{i}": (PROMPTS[i % len(PROMPTS)] + [i + 3], _mixed(i)) for i in range(32)}
    alone = {rid: _run(engine, {rid: r})[rid].output_token_ids for rid, r in requests.items()}
    together = {rid: s.output_token_ids for rid, s in _run(engine, requests).items()}
    assert together == alone
    assert len({tuple(t) for t in alone.values()}) > 16  # the parameters and seeds really differ


def test_extreme_values_beside_normal_requests_change_nothing_for_them(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    normal = {f"n{i}": (PROMPTS[i], SamplingParams(max_tokens=10, temperature=0.8 * (i % 2), seed=i))
              for i in range(len(PROMPTS))}
    expected = {rid: s.output_token_ids for rid, s in _run(engine, normal).items()}
    odd = {f"x{i}": (PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=10, **e)) for i, e in enumerate(EXTREMES)}
    seqs = _run(engine, {**normal, **odd})
    assert {rid: seqs[rid].output_token_ids for rid in normal} == expected
    for rid in odd:
        assert seqs[rid].finish_reason in (FinishReason.LENGTH, FinishReason.STOP), (rid, seqs[rid].error)
    greedy = _run(engine, {"g": (PROMPTS[0], SamplingParams(max_tokens=10))})["g"].output_token_ids
    assert seqs["x0"].output_token_ids == greedy  # a temperature below the floor is greedy
    assert engine.pool.num_used == 0


def test_a_failed_step_ends_only_the_requests_it_carried(tiny_model_dir, monkeypatch):
    engine = _engine(tiny_model_dir, max_running=2)
    params = SamplingParams(max_tokens=6)
    expected = _run(engine, {"c": (PROMPTS[2], params)})["c"].output_token_ids
    execute = engine.executor.execute
    failed_once = []

    def flaky(out):
        if not failed_once and any(item.seq.request_id == "a" for item in out.scheduled):
            failed_once.append(True)
            raise RuntimeError("injected step failure")
        return execute(out)

    monkeypatch.setattr(engine.executor, "execute", flaky)
    seqs = _run(engine, {"a": (PROMPTS[0], params), "b": (PROMPTS[1], params), "c": (PROMPTS[2], params)})
    assert failed_once
    for rid in ("a", "b"):  # the step that failed carried these two (max_running=2)
        assert seqs[rid].finish_reason is FinishReason.ERROR and "injected step failure" in seqs[rid].error
    assert seqs["c"].finish_reason is FinishReason.LENGTH and seqs["c"].output_token_ids == expected
    assert engine.pool.num_used == 0 and engine.failed_steps == 0


def test_a_row_that_cannot_be_sampled_ends_only_its_request(tiny_model_dir, monkeypatch):
    engine = _engine(tiny_model_dir)
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=3)
    expected = _run(engine, {"ok": (PROMPTS[1], params)})["ok"].output_token_ids
    batches = []  # the request ids of each sampled batch, in row order
    build, sample = local.SamplingBatch.from_sequences, local.sample

    def remember(seqs, masks=None):
        batches.append([s.request_id for s in seqs])
        return build(seqs, masks)

    def sample_with_nan(logits, batch):  # NaN logits for the row of "bad", once it has made two tokens
        ids = batches[-1]
        if "bad" in ids and len(engine_seqs["bad"].output_token_ids) >= 2:
            logits[ids.index("bad")] = float("nan")
        return sample(logits, batch)

    monkeypatch.setattr(local.SamplingBatch, "from_sequences", staticmethod(remember))
    monkeypatch.setattr(local, "sample", sample_with_nan)
    engine_seqs = {}
    engine_seqs["bad"] = engine.add_request("bad", PROMPTS[0], params)
    engine_seqs["ok"] = engine.add_request("ok", PROMPTS[1], params)
    while engine.has_work:
        engine.step()
    assert engine_seqs["bad"].finish_reason is FinishReason.ERROR and len(engine_seqs["bad"].output_token_ids) == 2
    assert "not finite" in engine_seqs["bad"].error
    assert engine_seqs["ok"].output_token_ids == expected


def test_an_engine_whose_steps_keep_failing_tells_its_owner_and_its_waiters(tiny_model_dir):
    engine = _engine(tiny_model_dir)

    def broken(out):
        raise RuntimeError("injected: every step fails")

    engine.executor.execute = broken
    fatal = threading.Event()
    async_engine = AsyncEngine(engine, on_fatal=lambda exc: fatal.set())

    async def scenario():
        errors = []
        for i in range(engine_module.MAX_FAILED_STEPS + 2):
            try:
                async for batch in async_engine.generate(f"r{i}", PROMPTS[0], SamplingParams(max_tokens=3)):
                    errors.append(batch[-1].error)
            except EngineDeadError as exc:
                errors.append(f"dead: {exc}")
        return errors

    try:
        errors = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        async_engine.stop()
    assert fatal.wait(10)
    steps = engine_module.MAX_FAILED_STEPS
    assert all("injected: every step fails" in e for e in errors[: steps - 1])  # ended one by one, served on
    assert all(e.startswith("dead:") for e in errors[steps - 1 :])  # then the engine gave up, and says so
    assert len(errors) == steps + 2


def test_min_tokens_ignore_eos_and_stop_token_ids_decide_where_an_answer_ends(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    eos = next(iter(engine.eos_token_ids))
    to_eos = ((eos, 100.0),)  # the model would end at once
    seqs = _run(engine, {
        "held": (PROMPTS[0], SamplingParams(max_tokens=10, min_tokens=4, logit_bias=to_eos)),
        "ignored": (PROMPTS[1], SamplingParams(max_tokens=6, ignore_eos=True, logit_bias=to_eos)),
        "stopped": (PROMPTS[2], SamplingParams(max_tokens=10, stop_token_ids=(99,), logit_bias=((99, 100.0),))),
    })
    held = seqs["held"]
    assert held.finish_reason is FinishReason.STOP and len(held.output_token_ids) == 5
    assert eos not in held.output_token_ids[:4] and held.output_token_ids[4] == eos
    assert seqs["ignored"].finish_reason is FinishReason.LENGTH and seqs["ignored"].output_token_ids == [eos] * 6
    assert seqs["stopped"].finish_reason is FinishReason.STOP and seqs["stopped"].output_token_ids == [99]
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=2, logit_bias=((10**6, 1.0),)))
