"""GGUF files of the families, written from a tiny random checkpoint as llama.cpp's converter names and
lays out their tensors, load to transformers' logits from the same weights (fp32 within 1e-4, prefill
and decode over the paged cache); quantized blocks are dequantized and name the precision that
`--quantization auto` serves; what cannot be read is refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from services.model_shard.model.evaluate import prompt_logits
from services.model_shard.model.gguf_checkpoint import open_gguf
from services.model_shard.model.llama import UnsupportedModel, load_model
from services.model_shard.model.precision import published_quantization

from .gguf_writer import write_gguf
from .test_families import FAMILIES, WINDOW, _build, _ids, _reference, paged_logits

# What llama.cpp's GGUF carries of each family: Mistral without a window (v0.2 on), Qwen2 without
# sliding layers, Gemma's attention scaled by head_dim (its converter writes no query_pre_attn_scalar).
GGUF_FAMILIES = {
    "llama3": FAMILIES["llama3"][1] | dict(attention_bias=False, mlp_bias=False),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),
    "gemma2": FAMILIES["gemma2"][1] | dict(query_pre_attn_scalar=16),
    "gemma3": dict(query_pre_attn_scalar=16, sliding_window=WINDOW, rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e6),
        sliding_attention=dict(rope_type="default", rope_theta=1e4))),
}


@pytest.fixture(scope="module", params=list(GGUF_FAMILIES))
def gguf_family(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"gguf-{family}")
    model_dir = _build(family, root / "hf", extra=GGUF_FAMILIES[family])
    return family, model_dir, write_gguf(model_dir, root / f"{family}.gguf")


def test_a_gguf_file_loads_to_transformers_logits(gguf_family):
    family, model_dir, path = gguf_family
    ids = _ids(24)
    with torch.inference_mode():
        expected = _reference(model_dir)(torch.tensor([ids])).logits[0]
    ours = load_model(open_gguf(path))
    torch.testing.assert_close(prompt_logits(ours, ids), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(paged_logits(ours, ids, [5, 7]), expected, atol=1e-4, rtol=1e-4)


def test_quantized_blocks_are_dequantized_and_name_the_precision_served(tmp_path):
    model_dir = _build("qwen2", tmp_path / "hf", extra=GGUF_FAMILIES["qwen2"])
    ids = _ids(24)
    with torch.inference_mode():
        expected = _reference(model_dir)(torch.tensor([ids])).logits[0]
    for quant, served, bound in (("Q8_0", "int8", 0.95), ("Q4_0", "int4", 0.6)):
        folder = open_gguf(write_gguf(model_dir, tmp_path / f"q-{quant}.gguf", quant))
        assert published_quantization(folder) == served
        agree = (prompt_logits(load_model(folder), ids).argmax(-1) == expected.argmax(-1)).float().mean()
        assert agree >= bound, f"{quant}: top-1 agreement {agree:.2f}"


def test_what_a_gguf_file_cannot_say_is_refused_by_name(tmp_path):
    model_dir = _build("qwen2", tmp_path / "hf", extra=GGUF_FAMILIES["qwen2"])
    odd = write_gguf(model_dir, tmp_path / "odd.gguf", extra_tensors={"blk.0.attn_q.scale": np.ones(4, np.int32)})
    with pytest.raises(UnsupportedModel, match=r"GGUF tensor 'blk.0.attn_q.scale' is of type I32"):
        open_gguf(odd)
    with pytest.raises(UnsupportedModel, match="GGUF architecture 'rwkv6' is not supported; supported GGUF "
                                               "architectures: llama, qwen2, qwen3, gemma2, gemma3"):
        open_gguf(_rwkv(tmp_path / "rwkv.gguf"))


def _rwkv(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_shard_exits_non_zero_naming_the_gguf_architecture_it_refuses(tmp_path):
    path = _rwkv(tmp_path / "rwkv.gguf")
    done = subprocess.run([sys.executable, "-m", "services.model_shard", "--model", str(path)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "GGUF architecture 'rwkv6' is not supported; supported GGUF architectures: llama, qwen2" in done.stderr
