"""Greedy tokens do not depend on how a prompt was computed: cold, after its prefix was cached, in
chunks, or batched beside other requests, in every dtype and quantization the mesh serves. A resumed
stream, a response-cache entry and a fresh answer therefore agree."""

from __future__ import annotations

import pytest

from services.model_shard.engine.engine import DTYPES, EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model.llama import load_model
from services.tokenizer.text import Message, TextTokenizer

SYSTEM = ("You are a helpful assistant for a bicycle shop. Answer in two or three sentences, politely, "
          "and mention the shop's opening hours when it helps.")
QUESTIONS = ["Describe a cat to someone who has never seen one.", "How do I fix a flat tyre?",
             "What is the capital of France?", "Which bicycle suits a child of eight?",
             "Write a haiku about rain.", "Why is the sky blue?"]
# (dtype, quantization, KV cache dtype): the int8 KV cache with the weights this CPU serves by default.
CONFIGS = [("float32", None, "auto"), ("bfloat16", None, "auto"), ("bfloat16", "int8", "auto"),
           ("bfloat16", "int4", "auto"), ("bfloat16", "int4", "int8")]


@pytest.fixture(scope="module")
def prompts(real_model_dir):
    tok = TextTokenizer(real_model_dir)
    return [tok.encode_chat([Message("system", SYSTEM), Message("user", q)]) for q in QUESTIONS]


@pytest.mark.parametrize("dtype,quantization,kv_cache_dtype", CONFIGS)
def test_greedy_tokens_are_the_same_cold_warm_chunked_and_batched(real_model_dir, prompts, dtype, quantization,
                                                                  kv_cache_dtype):
    model = load_model(real_model_dir, DTYPES[dtype], quantization)
    params = SamplingParams(max_tokens=24)

    def engine(**config) -> LLMEngine:
        return LLMEngine(model, EngineConfig(dtype=dtype, quantization=quantization, kv_cache_bytes=64 << 20,
                                             kv_cache_dtype=kv_cache_dtype, **config))

    cold = engine(enable_prefix_caching=False)
    expected = [cold.generate([p], params)[0] for p in prompts]
    warm = engine()  # the shared system prompt's blocks are reused from the second prompt on
    assert [warm.generate([p], params)[0] for p in prompts] == expected
    assert warm.pool.stats.hit_tokens > 0
    batched = engine(enable_prefix_caching=False, max_batched_tokens=48)  # chunked prefills beside decodes
    assert batched.generate(prompts, params) == expected
    assert batched.stats.steps > len(prompts) * params.max_tokens // len(prompts)  # it really shared steps



def answers(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and their log-probabilities, all run together."""
    got = {f"p{i}": ([], []) for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    while engine.has_work:
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(out.new_logprobs or [])
    return [got[f"p{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("dtype,quantization,kv_cache_dtype", CONFIGS)
def test_greedy_logprobs_alone_are_the_same_bits_in_a_crowd(real_model_dir, dtype, quantization, kv_cache_dtype):
    """Six questions asked alone, then again among 42 streams that share their system prompt: prefills
    of hundreds of rows beside decodes of dozens, and prefix blocks reused. Not only the tokens but
    their log-probabilities must be the same bits: the row counts here are where torch's linears
    change a row's sums (MKL float32 from 2 rows, oneDNN bfloat16 at 64 and 256), which flips a
    greedy token only now and then but moves every log-probability."""
    tok = TextTokenizer(real_model_dir)
    crowd = [tok.encode_chat([Message("system", SYSTEM), Message("user", f"Customer {i} asks: {q}")])
             for i in range(7) for q in QUESTIONS]
    model = load_model(real_model_dir, DTYPES[dtype], quantization)
    params = SamplingParams(max_tokens=12, logprobs=True, raw_logprobs=True)
    config = dict(dtype=dtype, quantization=quantization, kv_cache_bytes=64 << 20, kv_cache_dtype=kv_cache_dtype)
    alone = LLMEngine(model, EngineConfig(enable_prefix_caching=False, **config))
    expected = [answers(alone, [p], params)[0] for p in crowd[::7]]
    together = LLMEngine(model, EngineConfig(max_batched_tokens=512, **config))
    assert answers(together, crowd, params)[::7] == expected
    assert together.pool.stats.hit_tokens > 0
