"""Tensor and pipeline parallel shards over Ray (gloo on CPU): same tokens as the local executor,
clear refusals, and a shard that survives the death of a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.executor.ray_workers import micro_batches
from services.model_shard.model.llama import LlamaConfig, check_parallel
from services.trace_view import load_spans

from .conftest import internal_channel, shard_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30 + i for i in range(40)], [3, 4]]


def _run(model_dir, params, **parallel) -> tuple[list[list[int]], list[list[float]]]:
    """Each request's tokens, and every log-probability it reported: its tokens', their alternatives',
    and its prompt's."""
    engine = LLMEngine.from_dir(model_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 20, **parallel))
    try:
        seqs = [engine.add_request(f"r{i}", p, params[i % len(params)]) for i, p in enumerate(PROMPTS)]
        logprobs: dict[str, list[float]] = {s.request_id: [] for s in seqs}
        while engine.has_work:
            for out in engine.step():
                logprobs[out.request_id] += out.new_logprobs or []
                logprobs[out.request_id] += [v for _, values in out.new_top_logprobs or () for v in values]
                logprobs[out.request_id] += out.prompt_logprobs or []
        return [s.output_token_ids for s in seqs], [logprobs[s.request_id] for s in seqs]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_shards_match_the_local_executor(tiny_model_dir, ray_cluster, tp, pp):
    params = [SamplingParams(max_tokens=12, logprobs=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=7, logprobs=True, top_logprobs=3,
                             prompt_logprobs=True)]
    local_tokens, local_logprobs = _run(tiny_model_dir, params)
    tokens, logprobs = _run(tiny_model_dir, params, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert tokens == local_tokens
    for ours, ref in zip(logprobs, local_logprobs):  # log-softmax of each token: every logit counts
        assert len(ours) == len(ref) and max(abs(a - b) for a, b in zip(ours, ref)) < 1e-4


def test_micro_batches_keep_order_and_balance_tokens():
    from types import SimpleNamespace

    items = [SimpleNamespace(num_new_tokens=n) for n in (40, 1, 1, 30, 1, 1)]
    batches = micro_batches(items, 2)
    assert [i for b in batches for i in b] == items and len(batches) == 2
    assert micro_batches(items[:1], 4) == [items[:1]]


def test_a_split_the_model_cannot_take_is_refused_clearly(tiny_model_dir, real_model_dir):
    with pytest.raises(ValueError, match=r"does not divide the model's 4 attention heads.*use one of \[1, 2\]"):
        check_parallel(LlamaConfig.from_dir(tiny_model_dir), 3, 1)
    with pytest.raises(ValueError, match=r"does not divide the model's 9 attention heads.*use one of \[1, 3\]"):
        check_parallel(LlamaConfig.from_dir(real_model_dir), 2, 1)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        check_parallel(LlamaConfig.from_dir(tiny_model_dir), 1, 3)
    shard = subprocess.run([sys.executable, "-m", "services.model_shard", "--model", str(real_model_dir),
                            "--tensor-parallel-size", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shard.returncode == 2 and "use one of [1, 3]" in shard.stderr


@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)])
def test_the_real_model_gives_the_same_answer_split(real_model_dir, ray_cluster, tp, pp):
    from services.tokenizer.text import Message, TextTokenizer

    text = TextTokenizer(real_model_dir)
    prompt = text.encode_chat([Message("user", "What is the capital of France?")])
    params = SamplingParams(max_tokens=16)
    config = dict(block_size=16, kv_cache_bytes=64 << 20)
    local = LLMEngine.from_dir(real_model_dir, EngineConfig(**config)).generate([prompt], params)[0]
    split = LLMEngine.from_dir(real_model_dir, EngineConfig(**config, tensor_parallel_size=tp, pipeline_parallel_size=pp))
    try:
        assert split.generate([prompt], params)[0] == local
    finally:
        split.shutdown()
    assert "Paris" in text.decode(local)


def test_a_killed_worker_fails_its_streams_then_the_shard_rebuilds_and_serves(tiny_model_dir, tmp_path):
    env = {**os.environ, "LLMMESH_TRACE_DIR": str(tmp_path / "traces"), "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with shard_process(tiny_model_dir, tmp_path / "shard.log", "--tensor-parallel-size", "2", "--kv-cache-mb", "4",
                       env=env) as (listen, _):
        channel = internal_channel(listen)
        stub = shard_pb2_grpc.ModelShardStub(channel)
        info = stub.Info(shard_pb2.ShardInfoRequest(), timeout=30)
        assert info.tensor_parallel_size == 2 and [w.rank for w in info.workers] == [0, 1]
        assert all(w.node for w in info.workers)  # the Ray node each runs on

        # The workers' spans join the request's trace, under the shard's Generate span.
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        traced = shard_pb2.ShardGenerateRequest(prompt_token_ids=list(range(3, 40)),
                                                sampling=common_pb2.SamplingParams(max_tokens=4))
        list(stub.Generate(traced, timeout=60, metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")]))

        def trace_spans():
            return [sp for sp in load_spans(tmp_path / "traces") if sp["context"]["trace_id"] == "0x" + trace_id]

        def worker_spans():
            return [sp for sp in trace_spans() if sp["name"] == "worker.forward"]

        assert wait_for(lambda: {sp["attributes"]["llmmesh.rank"] for sp in worker_spans()} == {0, 1}, timeout=30)
        generate = next(sp for sp in trace_spans() if sp["name"].endswith("ModelShard/Generate"))
        assert {sp["parent_id"] for sp in worker_spans()} == {generate["context"]["span_id"]}

        index = stub.WatchPrefixIndex(shard_pb2.WatchPrefixIndexRequest(), timeout=120)
        mirror = set(next(index).added)
        assert mirror  # the traced prompt's blocks are cached

        statuses: list[int] = []
        serving_again = threading.Event()

        def watch():
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120):
                statuses.append(reply.status)
                if health_pb2.HealthCheckResponse.NOT_SERVING in statuses and \
                        reply.status == health_pb2.HealthCheckResponse.SERVING:
                    serving_again.set()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        request = shard_pb2.ShardGenerateRequest(prompt_token_ids=[5, 6, 7],
                                                 sampling=common_pb2.SamplingParams(max_tokens=480))
        stream = stub.Generate(request, timeout=120)
        next(stream)
        os.kill(info.workers[1].pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "worker 1 died" in err.value.details()

        assert serving_again.wait(120), statuses
        # Routers following the index hear that the rebuilt engine lost every cached block.
        for update in index:
            mirror = (mirror | set(update.added)) - set(update.removed)
            if update.removed and not mirror:
                break
        index.cancel()
        assert mirror == set()
        rebuilt = stub.Info(shard_pb2.ShardInfoRequest(), timeout=30)
        assert info.workers[1].pid not in [w.pid for w in rebuilt.workers]
        tokens = [t for m in stub.Generate(request, timeout=120) for t in m.token_ids]
        assert 0 < len(tokens) <= 480


def test_a_grammar_constrains_the_rows_sampled_by_parallel_workers(vocab_sized_tiny_model, ray_cluster):
    """The masks travel with the step to the worker that samples: the same constrained tokens as locally."""
    import re

    from services.model_shard.engine.grammar import OutputSpec
    from services.tokenizer.text import TextTokenizer

    tok = TextTokenizer(vocab_sized_tiny_model)
    spec = OutputSpec("regex", "[a-z]{3,10}( [a-z]{3,10}){2}")
    params = SamplingParams(max_tokens=40, temperature=0.9, seed=4, structured=spec)

    def run(**parallel) -> list[int]:
        engine = LLMEngine.from_dir(vocab_sized_tiny_model, EngineConfig(block_size=4, kv_cache_bytes=4 << 20,
                                                                         **parallel))
        try:
            return engine.generate([[1, 2, 3, 4, 5]], params)[0]
        finally:
            engine.shutdown()

    local = run()
    assert run(tensor_parallel_size=2, pipeline_parallel_size=2) == local
    assert re.fullmatch("[a-z]{3,10}( [a-z]{3,10}){2}", tok.decode(local))


def test_speculative_drafts_are_checked_by_parallel_workers(tiny_model_dir, ray_cluster):
    """A drafted row's positions sample on the workers as locally: the same tokens as without speculation."""
    from services.model_shard.engine.speculative import SpeculativeConfig

    prompts = [[5, 6, 7, 8] * 6, [9, 10, 11, 12, 13] * 4]
    params = [SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, temperature=0.9, seed=3)]

    def run(method: str, **parallel) -> tuple[list[list[int]], int]:
        engine = LLMEngine.from_dir(tiny_model_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 20, **parallel,
                                                                 speculative=SpeculativeConfig(method=method)))
        try:
            tokens = [engine.generate([p], sp)[0] for p in prompts for sp in params]
            speculator = engine.scheduler.speculator
            return tokens, speculator.totals().checks if speculator else 0
        finally:
            engine.shutdown()

    local, _ = run("off")
    split, checks = run("ngram", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert split == local and checks > 0
