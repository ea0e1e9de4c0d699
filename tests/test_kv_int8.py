"""The int8 KV cache (model/kv_format.py): rows written by the native kernel and by torch are the
same bytes; attention over them, native and torch, for decode rows and prompt chunks, stays within
a stated tolerance of float32 attention over the unquantized keys and values."""

from __future__ import annotations

import pytest
import torch

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model import native
from services.model_shard.model.kv_format import dequantize_rows, quantize_rows, resolve_kv_cache_dtype
from services.model_shard.model.llama import (AttentionMetadata, DecodeBatch, PrefillSpan, RotaryEmbedding,
                                              load_model)

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
# Against float32 attention over the unquantized rows (randn keys and values, |x| up to ~4): an int8
# step is absmax / 127 ~ 0.03, so a score moves by ~5e-3 and an output by ~1e-2 at worst.
TOL_VS_FP32 = 3e-2


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
    """float64 attention of q [B, H, D] over each row's context in k, v [KVH, S, D] (float)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    kvh, heads, dim = k.shape[0], q.shape[1], q.shape[2]
    for b, (blocks, length) in enumerate(zip(batch.block_tables.tolist(), batch.context_lens.tolist())):
        slots = torch.tensor([blk * batch.block_size + i for blk in blocks for i in range(batch.block_size)])[:length]
        kb = k[:, slots].double().repeat_interleave(heads // kvh, dim=0)
        vb = v[:, slots].double().repeat_interleave(heads // kvh, dim=0)
        probs = (q[b].double().unsqueeze(1) @ kb.transpose(1, 2) * dim**-0.5).softmax(-1)
        out[b] = (probs @ vb).squeeze(1)
    return out


def scattered_tables(lengths: list[int], block_size: int, num_blocks: int, gen) -> list[list[int]]:
    order, tables, used = torch.randperm(num_blocks, generator=gen).tolist(), [], 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(order[used: used + count])
        used += count
    return tables


def test_torch_rows_round_trip_within_half_a_step():
    x = torch.randn(5, 3, 64) * torch.tensor([0.01, 1.0, 30.0]).view(1, 3, 1)
    x[0, 0] = 0  # an all-zero row has scale 0 and reads back as zeros
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 66)
    back = dequantize_rows(rows, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((back - x).abs() <= step * 0.51 + 1e-12)
    assert torch.equal(back[0, 0], torch.zeros(64))


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_cache_write_is_the_torch_rows_bytes(dtype):
    heads, kv_heads, dim, tokens, slots = 9, 3, 64, 37, 64
    gen = torch.Generator().manual_seed(1)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 3).to(dtype)
    rope = RotaryEmbedding.from_parameters({"rope_theta": 10000.0}, dim, 256)
    cos_sin = rope.lookup(torch.arange(tokens))
    where = torch.randperm(slots, generator=gen)[:tokens]
    k_cache, v_cache = (torch.zeros(kv_heads, slots, dim + 2, dtype=torch.int8) for _ in range(2))
    q, k = native.rope_and_cache(qkv, *cos_sin, where, k_cache, v_cache, heads)
    values = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    assert torch.equal(k_cache[:, where], quantize_rows(k).transpose(0, 1))
    assert torch.equal(v_cache[:, where], quantize_rows(values).transpose(0, 1))
    float_k, float_v = (torch.zeros(kv_heads, slots, dim, dtype=dtype) for _ in range(2))
    q_float, k_float = native.rope_and_cache(qkv, *cos_sin, where, float_k, float_v, heads)
    assert torch.equal(q, q_float) and torch.equal(k, k_float)  # the rotation is the float cache's


def int8_case(dtype, heads, kv_heads, dim, lengths, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 96
    k, v = (torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype) for _ in range(2))
    tables = scattered_tables(lengths, block_size, num_blocks, gen)
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    return q, k, v, DecodeBatch.build(list(range(len(lengths))), tables, lengths, block_size)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("lengths", [[1, 16, 17, 100, 5, 64], [333]], ids=["decode-batch", "one-stream"])
def test_native_int8_decode_attention_against_float32(dtype, heads, kv_heads, dim, lengths):
    """Within TOL_VS_FP32 of float32 attention over the unquantized rows, and within float rounding
    of attention over the rows as dequantized (the kernel adds no error of its own)."""
    q, k, v, batch = int8_case(dtype, heads, kv_heads, dim, lengths)
    k8, v8 = quantize_rows(k), quantize_rows(v)
    got = native.paged_decode_attention(q, k8, v8, batch.block_tables, batch.context_lens, batch.block_size, dim**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), reference(q, k.float(), v.float(), batch), atol=TOL_VS_FP32, rtol=0)
    exact = reference(q, dequantize_rows(k8, torch.float64), dequantize_rows(v8, torch.float64), batch)
    rounding = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), exact, atol=rounding, rtol=rounding)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_int8_prompt_chunk_attention_against_float32(dtype):
    """A chunk of 40 tokens after 50 cached ones, as the model runs it: each token a row of the paged
    kernel over the context up to itself (PrefillSpan.paged)."""
    heads, kv_heads, dim, block = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(5)
    k, v = (torch.randn(kv_heads, 12 * block, dim, generator=gen).to(dtype) for _ in range(2))
    span = PrefillSpan(0, 40, 50, torch.randperm(12, generator=gen).tolist()[:6], block)
    rows = span.paged
    q = torch.randn(40, heads, dim, generator=gen).to(dtype)
    got = native.paged_decode_attention(q, quantize_rows(k), quantize_rows(v), rows.block_tables, rows.context_lens,
                                        block, dim**-0.5)
    torch.testing.assert_close(got.double(), reference(q, k.float(), v.float(), rows), atol=TOL_VS_FP32, rtol=0)


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "torch"])
def test_model_logits_with_int8_kv_against_float32_kv(tiny_model_dir, native_kernels):
    """The tiny model, float32: a 30-token prompt in two chunks (the second over the first's cached
    blocks), then 4 decode steps, with an int8 cache against a float32 one; native and torch paths."""
    if native_kernels and not native.available():
        pytest.skip("native kernels unavailable")
    model = load_model(tiny_model_dir, torch.float32, native_kernels=native_kernels)
    prompt = torch.randint(0, model.cfg.vocab_size, (34,), generator=torch.Generator().manual_seed(3))
    logits = {kv: run_chunks_then_decodes(model, prompt, kv) for kv in ("auto", "int8")}
    scale = logits["auto"].abs().max().item()
    torch.testing.assert_close(logits["int8"], logits["auto"], atol=0.02 * scale, rtol=0)
    assert not torch.equal(logits["int8"], logits["auto"])  # the int8 cache was really read


def run_chunks_then_decodes(model, ids: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """Logits of the last row of each step: chunks [0, 18), [18, 30), then tokens 30..33 one a step."""
    from services.model_shard.model.kv_format import new_kv_cache

    block, blocks = 8, list(range(5))
    caches = [new_kv_cache(model.num_kv_heads, 5 * block, model.cfg.head_dim, model.dtype, kv_cache_dtype)
              for _ in model.layers]
    out = []
    with torch.inference_mode():
        for start, end in ((0, 18), (18, 30)):
            span = PrefillSpan(0, end - start, start, blocks, block)
            meta = AttentionMetadata(slot_mapping=torch.arange(start, end), prefills=[span])
            hidden = model(ids[start:end], torch.arange(start, end), caches, meta)
            out.append(model.compute_logits(hidden[-1:]))
        for pos in range(30, 34):
            meta = AttentionMetadata(slot_mapping=torch.tensor([pos]),
                                     decode=DecodeBatch.build([0], [blocks], [pos + 1], block))
            hidden = model(ids[pos: pos + 1], torch.tensor([pos]), caches, meta)
            out.append(model.compute_logits(hidden))
    return torch.cat(out)


def test_kv_cache_dtype_choices():
    assert resolve_kv_cache_dtype("auto", "bfloat16").value == "bfloat16"
    assert resolve_kv_cache_dtype("int8", "float32").value == "int8"
    assert resolve_kv_cache_dtype("float32", "float32").value == "float32"
    with pytest.raises(ValueError, match="stored at the model's dtype"):
        resolve_kv_cache_dtype("bfloat16", "float32")
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        resolve_kv_cache_dtype("fp8", "bfloat16")


def test_int8_blocks_hold_nearly_twice_the_tokens(tiny_model_dir):
    """Same memory, bfloat16 KV against int8: (D + 2) bytes a row against 2 D; a layout of its own."""
    model = load_model(tiny_model_dir, torch.bfloat16)
    engines = {kv: LLMEngine(model, EngineConfig(dtype="bfloat16", block_size=4, kv_cache_bytes=1 << 20,
                                                 kv_cache_dtype=kv)) for kv in ("auto", "int8")}
    d = model.cfg.head_dim
    assert engines["int8"].kv_capacity.blocks == engines["auto"].kv_capacity.blocks * 2 * d // (d + 2)
    assert engines["int8"].kv_capacity.bytes_per_token * 2 * d == engines["auto"].kv_capacity.bytes_per_token * (d + 2)
    assert engines["int8"].executor.kv_cache_bytes_per_block == engines["int8"].kv_capacity.bytes_per_token * 4
    assert engines["int8"].kv_layout != engines["auto"].kv_layout and "int8" in engines["int8"].kv_layout
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7]]
    assert engines["int8"].generate(prompts, SamplingParams(max_tokens=6))  # serves


# --- the real model: perplexity and answers against bfloat16 KV ---

# A fixed Chinese text (plain descriptive prose) beside test_quality's English one.
CHINESE = ("长江是中国最长的河流，发源于青藏高原，流经十一个省份，最后注入东海。几千年来，人们在江边种植水稻，"
           "捕鱼，修建城市。每年春天，江水上涨，农民们忙着耕地和插秧。到了秋天，稻田变成金黄色，村子里到处都是丰收的笑声。"
           "今天，长江上有许多大桥和港口，船只来来往往，把货物运到全国各地。")
# Greedy tokens of each quality question that int8 KV must give exactly as bfloat16 KV does (of 24).
AGREED_TOKENS = 8


@pytest.fixture(scope="module")
def bf16_model(real_model_dir):
    return load_model(real_model_dir, torch.bfloat16)


@pytest.mark.parametrize("language", ["english", "chinese"])
def test_perplexity_with_int8_kv_within_one_percent_of_bfloat16_kv(real_model_dir, bf16_model, language):
    from services.model_shard.model.evaluate import perplexity
    from services.tokenizer.text import TextTokenizer

    from .test_quality import TEXT

    ids = TextTokenizer(real_model_dir).encode(TEXT if language == "english" else CHINESE)
    bf16, int8 = perplexity(bf16_model, ids), perplexity(bf16_model, ids, "int8")
    print(f"perplexity {language}: bfloat16 KV {bf16:.3f}, int8 KV {int8:.3f}")
    assert abs(int8 - bf16) / bf16 < 0.01


def test_greedy_answers_with_int8_kv_agree_with_bfloat16_kv(real_model_dir, bf16_model):
    from services.tokenizer.text import Message, TextTokenizer

    from .test_quality import EXPECTED, QUESTIONS

    tok = TextTokenizer(real_model_dir)
    prompts = [tok.encode_chat([Message("user", q)]) for q in QUESTIONS]
    answers = {kv: LLMEngine(bf16_model, EngineConfig(dtype="bfloat16", kv_cache_bytes=32 << 20, kv_cache_dtype=kv))
               .generate(prompts, SamplingParams(max_tokens=24)) for kv in ("auto", "int8")}
    for ref, got, expected in zip(answers["auto"], answers["int8"], EXPECTED):
        agreed = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        print(f"agreed for {agreed} tokens: {tok.decode(got)!r}")
        assert agreed >= min(AGREED_TOKENS, len(ref)) and expected in tok.decode(got).lower()


# --- blocks through the cache service ---


def test_int8_blocks_are_shared_between_int8_replicas_and_refused_to_bfloat16_ones(tiny_model_dir):
    """A real cache service on loopback: replica A (int8 KV) uploads its prompt blocks; replica B
    (int8) fetches and serves from them, with A's tokens; replica C (bfloat16 KV) is given none,
    and refuses A's bytes if handed them."""
    import asyncio

    import grpc

    from llmmesh.v1 import cache_pb2_grpc
    from services.cache.server import CacheServicer
    from services.cache.store import LRUByteStore
    from services.common.block_hash import chain_block_hashes
    from services.common.hash_ring import HashRing
    from services.model_shard.kv_share import SharedKvBlocks

    model = load_model(tiny_model_dir, torch.bfloat16)

    def replica(kv: str, **config) -> LLMEngine:
        return LLMEngine(model, EngineConfig(dtype="bfloat16", block_size=4, kv_cache_bytes=1 << 20,
                                             kv_cache_dtype=kv, **config), model_id="tiny")

    a, b, c = replica("int8"), replica("int8"), replica("auto")
    cold = replica("int8", enable_prefix_caching=False)
    prefix = [(7 * i) % 250 + 3 for i in range(40)]  # 10 blocks
    prompt, params = prefix + [21, 22, 23], SamplingParams(max_tokens=8)
    hashes = chain_block_hashes(prompt, 4)[: (len(prompt) - 1) // 4]

    async def scenario():
        server = grpc.aio.server()
        cache_pb2_grpc.add_CacheServicer_to_server(CacheServicer(LRUByteStore(1 << 20), LRUByteStore(8 << 20)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        shared = {e: SharedKvBlocks(HashRing({"cache": cache_pb2_grpc.CacheStub(channel)}), e.kv_layout)
                  for e in (a, b, c)}
        try:
            shared[a].start()
            a.prompt_block_listener = lambda h, data, retain: shared[a].offer(h, data, retain)
            a.generate([prefix + [11, 12]], params)
            await shared[a].drain()
            return [await shared[e].fetch(hashes) for e in (b, c)]
        finally:
            await shared[a].stop()
            await channel.close()
            await server.stop(0)

    to_b, to_c = asyncio.run(scenario())
    assert len(to_b.values) == 10 and all(len(v) == b.executor.kv_cache_bytes_per_block for v in to_b.values)
    assert b.import_blocks(hashes, to_b.values) == 10
    assert b.generate([prompt], params) == cold.generate([prompt], params)
    assert b.stats.computed_tokens == cold.stats.computed_tokens - 40
    assert to_c.values == []  # another layout: the cache holds nothing for it
    with pytest.raises(ValueError, match="bytes"):
        c.import_blocks(hashes, to_b.values)


def test_tensor_and_pipeline_parallel_int8_kv_matches_the_local_engine(tiny_model_dir, ray_cluster):
    """Each rank quantizes its own KV heads' rows, so a 2 x 2 split gives the local engine's tokens;
    a block is the ranks' int8 shares together, the local block's size."""
    config = dict(block_size=4, kv_cache_bytes=1 << 20, kv_cache_dtype="int8")
    prompts, params = [[5, 6, 7, 8, 9, 10, 11], [30 + i for i in range(40)]], SamplingParams(max_tokens=10)
    local = LLMEngine.from_dir(tiny_model_dir, EngineConfig(**config))
    split = LLMEngine.from_dir(tiny_model_dir, EngineConfig(**config, tensor_parallel_size=2, pipeline_parallel_size=2))
    try:
        assert split.generate(prompts, params) == local.generate(prompts, params)
        assert split.executor.kv_cache_bytes_per_block == local.executor.kv_cache_bytes_per_block
    finally:
        split.shutdown()


# --- the shard process ---


def test_a_shard_serves_int8_kv_and_reports_its_capacity(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc

    from .conftest import ROOT, free_ports, internal_channel, scrape_metrics, shard_process

    (port,) = free_ports(1)
    log = tmp_path / "shard.log"
    with shard_process(tiny_model_dir, log, "--dtype", "bfloat16", "--kv-cache-dtype", "int8", "--kv-cache-mb", "4",
                       "--threads", "1", "--metrics-port", str(port)) as (listen, _):
        with internal_channel(listen) as channel:
            request = shard_pb2.ShardGenerateRequest(prompt_token_ids=[5, 6, 7, 8, 9],
                                                     sampling=common_pb2.SamplingParams(max_tokens=6))
            tokens = [t for m in shard_pb2_grpc.ModelShardStub(channel).Generate(request, timeout=60) for t in m.token_ids]
        samples = scrape_metrics(port)
    assert len(tokens) == 6
    per_token = 2 * 2 * 2 * (16 + 2)  # K and V, 2 layers, 2 KV heads, 16-dim rows + their scale
    assert samples[("llmmesh_kv_cache_bytes_per_token", ())] == per_token
    assert samples[("llmmesh_kv_cache_tokens", ())] == samples[("llmmesh_kv_cache_blocks", ())] * 16
    assert samples[("llmmesh_kv_cache_tokens", ())] == (4 << 20) // (per_token * 16) * 16
    assert samples[("llmmesh_kv_cache_info", (("dtype", "int8"),))] == 1
    assert "KV cache dtype int8" in log.read_text() and f"{per_token} bytes per token" in log.read_text()

    refused = subprocess.run([sys.executable, "-m", "services.model_shard", "--model", str(tiny_model_dir),
                              "--dtype", "float32", "--kv-cache-dtype", "bfloat16"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "stored at the model's dtype" in refused.stderr
