"""The native paged decode-attention kernel against the same attention on stock torch ops."""

from __future__ import annotations

import os

import pytest
import torch

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model import native
from services.model_shard.model.llama import DecodeBatch, decode_attention


def test_native_kernels_build_here():
    """make install builds them; a machine with a compiler must not silently fall back."""
    if os.environ.get("LLMMESH_NATIVE_KERNELS") == "0":
        pytest.skip("native kernels switched off")
    assert native.available()


def torch_reference(q, k_cache, v_cache, batch: DecodeBatch) -> torch.Tensor:
    """Each sequence's context gathered into contiguous keys and values, attended in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    kvh, heads, dim = k_cache.shape[0], q.shape[1], q.shape[2]
    for b, (blocks, length) in enumerate(zip(batch.block_tables.tolist(), batch.context_lens.tolist())):
        slots = torch.tensor([blk * batch.block_size + i for blk in blocks for i in range(batch.block_size)])[:length]
        k = k_cache[:, slots].double().repeat_interleave(heads // kvh, dim=0)  # [H, L, D]
        v = v_cache[:, slots].double().repeat_interleave(heads // kvh, dim=0)
        probs = (q[b].double().unsqueeze(1) @ k.transpose(1, 2) * dim**-0.5).softmax(-1)  # [H, 1, L]
        out[b] = (probs @ v).squeeze(1)
    return out


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_paged_decode_attention_matches_reference(dtype, tol, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads * dim)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)
    # Lengths of one token, of whole blocks and of partial ones; blocks scattered over the cache.
    lengths = [1, 16, 17, 100, 5, 64]
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(order[used : used + count])
        used += count
    batch = DecodeBatch.build(list(range(len(lengths))), tables, lengths, block_size)
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)

    got = native.paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, block_size,
                                        dim**-0.5)
    expected = torch_reference(q, k_cache, v_cache, batch)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)

    # The stock torch path (gather + two matmuls) computes the same attention.
    flat = batch.block_tables.view(-1)
    kd = k_cache.view(kv_heads, -1, block_size, dim).index_select(1, flat).view(kv_heads, len(lengths), -1, dim)
    vd = v_cache.view(kv_heads, -1, block_size, dim).index_select(1, flat).view(kv_heads, len(lengths), -1, dim)
    torch.testing.assert_close(decode_attention(q, kd, vd, batch.bias).double(), expected, atol=tol, rtol=tol)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_native_and_torch_attention_give_the_same_greedy_tokens(real_model_dir):
    """The real model, float32, a batch of prompts of different lengths: same tokens either way."""
    prompts = [[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
               list(range(300, 340)), [1, 9690, 198, 504, 2]]
    outputs = []
    for native_kernels in (True, False):
        engine = LLMEngine.from_dir(real_model_dir, EngineConfig(kv_cache_bytes=64 << 20, native_kernels=native_kernels))
        assert engine.model.layers[0].self_attn.native_decode is native_kernels
        outputs.append(engine.generate(prompts, SamplingParams(max_tokens=24)))
    assert outputs[0] == outputs[1]
    assert all(len(tokens) > 0 for tokens in outputs[0])
