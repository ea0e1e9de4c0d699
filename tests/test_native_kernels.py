"""The native kernels (paged decode attention, add + RMSNorm, RoPE + KV cache write) against the
same computation on stock torch ops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model import native
from services.model_shard.model.llama import DecodeBatch, RMSNorm, RotaryEmbedding, decode_attention


def test_native_kernels_build_here():
    """make install builds them; a machine with a compiler must not silently fall back."""
    if os.environ.get("LLMMESH_NATIVE_KERNELS") == "0":
        pytest.skip("native kernels switched off")
    assert native.available()


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    """torch's builder waits without end for its lock file, which a killed build leaves behind: the
    next process (a copy of this machine's build, the lock an hour old) loads the kernels all the same."""
    if not native.available():
        pytest.skip("no native kernels here")
    from torch.utils import cpp_extension

    built = Path(cpp_extension._get_build_directory(native.NAME, verbose=False))
    root = tmp_path / "extensions"
    shutil.copytree(built, root / built.name, symlinks=True)  # where torch looks under TORCH_EXTENSIONS_DIR
    lock = root / built.name / "lock"
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    loaded = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(); "
                             "from services.model_shard.model import native; print(native.available())"], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)},
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=240)
    assert loaded.stdout.strip() == "True", loaded.stderr
    assert "by a kernel build that did not finish" in loaded.stderr and not lock.exists()


def test_a_recent_lock_is_waited_for_then_taken_as_left_behind(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    started = time.monotonic()
    native.clear_stale_lock(lock, stale_after_s=0.3)
    assert not lock.exists() and time.monotonic() - started >= 0.25  # it waited out the lock's youth


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
@pytest.mark.parametrize("lengths", [[1, 16, 17, 100, 5, 64], [333]], ids=["batch", "one-stream"])
def test_paged_decode_attention_matches_reference(dtype, tol, heads, kv_heads, dim, lengths):
    """Lengths of one token, of whole blocks and of partial ones, blocks scattered over the cache;
    and one sequence alone (its query heads are then split over the threads)."""
    check_paged_decode_attention(dtype, tol, heads, kv_heads, dim, lengths, block_size=16)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("block_size", [8, 32, 48])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (10, 2)], ids=["3-per-kv-head", "5-per-kv-head"])
def test_paged_decode_attention_other_block_sizes(block_size, heads, kv_heads):
    """Blocks shorter than the kernel's 16-key tiles, and longer ones that end mid-tile; a query-head
    group size with no vector instance (5) takes the portable loop."""
    check_paged_decode_attention(torch.bfloat16, 2e-2, heads, kv_heads, 64, [1, 7, 40, 100, 57, 16], block_size)


def check_paged_decode_attention(dtype, tol, heads, kv_heads, dim, lengths, block_size):
    gen = torch.Generator().manual_seed(heads * dim + block_size)
    num_blocks = 64 * 16 // block_size
    k_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)
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
@pytest.mark.parametrize("max_batched_tokens", [2048, 24], ids=["whole-prompts", "chunked"])
def test_native_and_torch_attention_give_the_same_greedy_tokens(real_model_dir, max_batched_tokens):
    """The real model, float32, a batch of prompts of different lengths: same tokens either way.
    Chunked, the later chunks attend over the cache (the native path reads it in place)."""
    prompts = [[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
               list(range(300, 340)), [1, 9690, 198, 504, 2]]
    outputs = []
    for native_kernels in (True, False):
        config = EngineConfig(kv_cache_bytes=64 << 20, native_kernels=native_kernels, max_batched_tokens=max_batched_tokens)
        engine = LLMEngine.from_dir(real_model_dir, config)
        assert engine.model.layers[0].self_attn.native is native_kernels
        outputs.append(engine.generate(prompts, SamplingParams(max_tokens=24)))
    assert outputs[0] == outputs[1]
    assert all(len(tokens) > 0 for tokens in outputs[0])


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_torch_norm(dtype, with_residual):
    gen = torch.Generator().manual_seed(7)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=gen) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(37, 576, generator=gen) * 3).to(dtype)
    residual = torch.randn(37, 576, generator=gen).to(dtype) if with_residual else None

    expected_out, expected_sum = norm(x, residual)  # stock torch ops
    got_out, got_sum = native.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(got_sum, expected_sum)
    # torch sums the squares in float32 (its order depends on the shape); the kernel in double.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_out, expected_out, atol=tol, rtol=tol)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_matches_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, slots_total = 9, 3, 64, 128
    rope = RotaryEmbedding(dim, 512, 10000.0)
    positions = torch.tensor([0, 1, 2, 77, 300, 5])
    slots = torch.tensor([10, 11, 12, 90, 3, 127])
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    cos_sin = rope.lookup(positions)

    k_cache = torch.zeros(kv_heads, slots_total, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q, k = native.rope_and_cache(qkv, *cos_sin, slots, k_cache, v_cache, heads)

    T = len(positions)
    qk = RotaryEmbedding.rotate(qkv[:, : (heads + kv_heads) * dim].view(T, heads + kv_heads, dim), cos_sin)
    v = qkv[:, (heads + kv_heads) * dim :].view(T, kv_heads, dim)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the compiler may fuse the multiply-adds
    torch.testing.assert_close(q, qk[:, :heads], atol=tol, rtol=tol)
    torch.testing.assert_close(k, qk[:, heads:], atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache[:, slots].transpose(0, 1), k, atol=0, rtol=0)
    assert torch.equal(v_cache[:, slots].transpose(0, 1), v)
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[:, untouched].any() and not v_cache[:, untouched].any()


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dtype, tol, inter", [(torch.float32, 1e-6, 1536), (torch.bfloat16, 0, 1536),
                                               (torch.bfloat16, 0, 24), (torch.float16, 0, 1536)])
def test_silu_and_mul_matches_torch(dtype, tol, inter):
    """Large gates of either sign (the sigmoid must not overflow) and torch's rounding in bfloat16;
    widths and dtypes without a vector pass take torch's own ops."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 2 * inter, generator=gen) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = x.split(inter, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = native.silu_and_mul(x)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)  # bfloat16: the same roundings, exactly


def quantize_int4_groups(w: torch.Tensor):
    """The Q4_1 grouping Int4Linear uses: q in [0, 15], w ~= d * q + m per group of 32."""
    n, k = w.shape
    groups = w.view(n, k // 32, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    d = ((high - low) / 15).clamp(min=1e-8)
    q = torch.clamp(torch.round((groups - low.unsqueeze(-1)) / d.unsqueeze(-1)), 0, 15).to(torch.int32).view(n, k)
    return q, d, low


def quantized_linear(kind: str, w: torch.Tensor):
    """The native kernel for w quantized as `kind`, and its arithmetic in float64: activations to
    int8 per group of 32 (scale max|x| / 127, rounded to nearest even), integer dot products, then
    the weights' scales (int4's d and m rounded to float16 as stored)."""
    n, k = w.shape

    def activations(x):
        xg = x.float().view(len(x), k // 32, 32)
        xd = xg.abs().amax(-1) / 127
        inv = torch.where(xd > 0, 1 / xd, torch.zeros_like(xd))
        return xg.double(), xd.double(), torch.round(xg * inv.unsqueeze(-1)).clamp(-127, 127).double()

    if kind == "int4":
        q, d, m = quantize_int4_groups(w)
        packed = native.int4_pack_weight(q, d, m)

        def reference(x):
            xg, xd, xq = activations(x)
            dots = torch.einsum("rgk,ngk->rng", xq, q.double().view(n, k // 32, 32))
            return (dots * d.half().double() * xd.unsqueeze(1) + m.half().double() * xg.sum(-1).unsqueeze(1)).sum(-1)

        return (lambda x: native.int4_linear(x, packed, n)), reference
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed = native.int8_pack_weight(q)

    def reference(x):
        _, xd, xq = activations(x)
        dots = torch.einsum("rgk,ngk->rng", xq, q.double().view(n, k // 32, 32))
        return (dots * xd.unsqueeze(1)).sum(-1) * scale.double()

    return (lambda x: native.int8_linear(x, packed, scale, n)), reference


@pytest.mark.skipif(not native.vnni_supported(), reason="the quantized kernels need AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (16, 32)])
def test_quantized_linear_matches_reference(kind, dtype, tol, out_features, in_features):
    """Row counts that take the 8-, 4- and 1-to-3-row tiles, and their sums (13 = 8 + 4 + 1)."""
    gen = torch.Generator().manual_seed(out_features + in_features)
    linear, reference = quantized_linear(kind, torch.randn(out_features, in_features, generator=gen) * 0.05)
    for rows in (1, 3, 4, 8, 13):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        x[0, :32] = 0  # an all-zero group (scale 0)
        got = linear(x)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        expected = reference(x)
        torch.testing.assert_close(got.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.skipif(not native.vnni_supported(), reason="the quantized kernels need AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_linear_rows_do_not_depend_on_the_batch(kind):
    """A row's output is bit for bit the same alone or among any number of other rows, so that
    batched and single generation give the same tokens."""
    gen = torch.Generator().manual_seed(11)
    linear, _ = quantized_linear(kind, torch.randn(576, 1536, generator=gen) * 0.05)
    x = torch.randn(21, 1536, generator=gen).to(torch.bfloat16)
    batched = linear(x)
    singles = torch.cat([linear(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(batched, singles)
    assert torch.equal(linear(x[5:14]), batched[5:14])


@pytest.mark.skipif(not native.vnni_supported(), reason="the quantized kernels need AVX-512 VNNI")
def test_quantized_weight_packing_refuses_bad_input():
    q, d, m = quantize_int4_groups(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="out_features of 16"):
        native.int4_pack_weight(q[:15], d[:15], m[:15])
    with pytest.raises(RuntimeError, match=r"\[0, 15\]"):
        native.int4_pack_weight(q + 1, d, m)
    with pytest.raises(RuntimeError, match=r"\[-127, 127\]"):
        native.int8_pack_weight(torch.full((16, 64), -128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="do not match"):
        native.int4_linear(torch.randn(2, 64), native.int4_pack_weight(q, d, m), 32)
    with pytest.raises(RuntimeError, match="scale must be"):
        native.int8_linear(torch.randn(2, 64), native.int8_pack_weight(q), torch.ones(8), 16)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.int4_linear(torch.randn(2, 64, dtype=torch.float64), native.int4_pack_weight(q, d, m), 16)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("vocab", [49152, 100])
def test_token_bitmask_matches_unpacked_bits(vocab):
    """Each row's logits outside its bitmask become -inf, other rows and allowed tokens untouched;
    tokens past the mask's words are blocked."""
    torch.manual_seed(0)
    words = -(-vocab // 32)
    logits = torch.randn(6, vocab)
    rows = torch.tensor([4, 0, 2])
    masks = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32)
    masks[1] = -1  # everything allowed
    masks[2, : words // 2] = 0  # the first half blocked
    expected = logits.clone()
    bits = ((masks.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten(1)[:, :vocab]
    for j, row in enumerate(rows.tolist()):
        expected[row][~bits[j]] = float("-inf")
    native.apply_token_bitmask(logits, rows, masks)
    assert torch.equal(logits, expected)
    short = torch.randn(1, 100)
    native.apply_token_bitmask(short, torch.tensor([0]), torch.full((1, 3), -1, dtype=torch.int32))
    assert torch.isinf(short[0, 96:]).all() and torch.isfinite(short[0, :96]).all()
    with pytest.raises(RuntimeError, match="row out of range"):
        native.apply_token_bitmask(logits, torch.tensor([6]), masks[:1])
