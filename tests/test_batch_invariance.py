"""Every kernel the model runs gives a row the same numbers, bit for bit, alone or with up to 300
other rows: row 0 of a batch of M rows against row 0 alone, for M = 1..300. That is what makes
greedy answers independent of the batch, on any CPU (see model/dense.py for why each kernel is)."""

from __future__ import annotations

import pytest
import torch

from services.model_shard.model import native
from services.model_shard.model.dense import DenseLinear
from services.model_shard.model.kv_format import quantize_rows
from services.model_shard.model.quant import Int4Linear, Int8Linear

ROWS = 300
needs_dense = pytest.mark.skipif(not native.dense_supported(), reason="the dense kernel needs a CPU with AVX-512")
needs_vnni = pytest.mark.skipif(not native.vnni_supported(), reason="the quantized kernels need AVX-512 VNNI")


def assert_row0_is_batch_invariant(f, x: torch.Tensor, batch_sizes=range(1, ROWS + 1)) -> None:
    """f(x[a:b]) computes rows a..b-1; or pass rows_of(f) a function of (a, b) itself."""
    of = f if getattr(f, "takes_range", False) else (lambda a, b: f(x[a:b]))
    alone = of(0, 1)
    for m in batch_sizes:
        got = of(0, m)
        assert torch.equal(got[:1], alone), f"row 0 of a batch of {m} differs from row 0 alone"
        assert torch.equal(got[m - 1 : m], of(m - 1, m)), f"row {m - 1} of a batch of {m} differs from it alone"


def rows_of(f):
    f.takes_range = True
    return f


def weights(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def rows(in_features: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(ROWS, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


@needs_dense
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (2056, 576)])
def test_dense_linear_rows_do_not_depend_on_the_batch(dtype, out_features, in_features):
    """The model's projection shapes, and an output count that leaves a part block (2056 = 128 x 16 + 8)."""
    layer = DenseLinear(weights(out_features, in_features, out_features).to(dtype))
    assert_row0_is_batch_invariant(layer, rows(in_features, dtype))


@needs_dense
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_lm_head_rows_do_not_depend_on_the_batch(dtype):
    """The LM head (576 -> 49 152): oneDNN's AMX kernel changes row 0 from 33 rows on, MKL's float32
    from 2. The batch sizes around those thresholds, and the largest."""
    head = DenseLinear(weights(49152, 576, 3).to(dtype), float_out=True)
    assert_row0_is_batch_invariant(head, rows(576, dtype), batch_sizes=(1, 2, 3, 16, 32, 33, 64, 65, ROWS))


@needs_dense
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_dense_linear_matches_torch(dtype, tol):
    """Within rounding of torch's linear (float32 accumulation either way); the bias is added after."""
    w, bias = weights(2056, 576, 5).to(dtype), torch.randn(2056).to(dtype)
    x = rows(576, dtype)[:37]
    expected = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    got = DenseLinear(w, bias)(x)
    assert got.dtype == dtype and got.shape == (37, 2056)
    torch.testing.assert_close(got.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    logits = DenseLinear(w, float_out=True)(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), torch.nn.functional.linear(x.double(), w.double()), atol=1e-4, rtol=1e-4)


@needs_dense
def test_dense_packing_refuses_bad_input():
    with pytest.raises(RuntimeError, match="even"):
        native.dense_pack_weight(torch.zeros(16, 33, dtype=torch.bfloat16))
    packed = native.dense_pack_weight(torch.zeros(16, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="do not match"):
        native.dense_linear(torch.zeros(2, 32, dtype=torch.bfloat16), packed, 16)
    with pytest.raises(RuntimeError, match="dtype"):
        native.dense_linear(torch.zeros(2, 64), packed, 16)


@needs_vnni
@pytest.mark.parametrize("linear", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536)])
def test_quantized_linear_rows_do_not_depend_on_the_batch_up_to_300(linear, out_features, in_features):
    layer = linear(weights(out_features, in_features, 7), torch.bfloat16, native_kernel=True)
    assert layer.native
    assert_row0_is_batch_invariant(layer, rows(in_features, torch.bfloat16))


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dtype, kv_int8", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True),
                                            (torch.float32, True)], ids=["bf16", "fp32", "bf16-int8kv", "fp32-int8kv"])
def test_paged_attention_rows_do_not_depend_on_the_batch(dtype, kv_int8):
    """Decode rows of up to 300 sequences of different lengths over one cache: sequence 0's output is
    the same whatever sequences come with it; over a float cache or an int8 one (kv_format.py)."""
    heads, kv_heads, dim, block = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(9)
    lengths = torch.randint(1, 80, (ROWS,), generator=gen)
    lengths[0] = 67
    width = -(-int(lengths.max()) // block)
    tables = torch.randperm(ROWS * width, generator=gen).view(ROWS, width)
    k_cache, v_cache = (torch.randn(kv_heads, ROWS * width * block, dim, generator=gen).to(dtype) for _ in range(2))
    if kv_int8:
        k_cache, v_cache = quantize_rows(k_cache), quantize_rows(v_cache)
    q = torch.randn(ROWS, heads, dim, generator=gen).to(dtype)

    @rows_of
    def attend(a: int, b: int) -> torch.Tensor:
        return native.paged_decode_attention(q[a:b], k_cache, v_cache, tables[a:b], lengths[a:b], block, dim**-0.5)

    assert_row0_is_batch_invariant(attend, q, batch_sizes=(1, 2, 3, 4, 7, 16, 33, 64, 129, ROWS))


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_norm_and_activation_rows_do_not_depend_on_the_batch():
    x, residual = rows(576, torch.bfloat16, 2), rows(576, torch.bfloat16, 3)
    weight = torch.rand(576).to(torch.bfloat16) + 0.5
    norm = rows_of(lambda a, b: native.add_rms_norm(x[a:b], residual[a:b], weight, 1e-5)[0])
    assert_row0_is_batch_invariant(norm, x, batch_sizes=(1, 2, 17, 64, ROWS))
    gate_up = rows(2 * 1536, torch.bfloat16, 4)
    assert_row0_is_batch_invariant(native.silu_and_mul, gate_up, batch_sizes=(1, 2, 17, 64, ROWS))
