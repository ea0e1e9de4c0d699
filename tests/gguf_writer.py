"""A Hugging Face checkpoint written to GGUF as llama.cpp's convert_hf_to_gguf.py writes it: the gguf
package's metadata keys and tensor names, q/k rows permuted for llama's rotary layout, Gemma's norms
stored as 1 + weight, Llama 3's RoPE scaling as a rope_freqs tensor of per-frequency factors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma2": "GEMMA2",
         "gemma3_text": "GEMMA3"}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(d: dict) -> np.ndarray:
    p = d["rope_parameters"]
    dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(p["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model_dir: Path, out: Path, quant: str = "F32", extra_tensors: dict | None = None) -> Path:
    import gguf
    from safetensors.torch import load_file

    d = json.loads((model_dir / "config.json").read_text())
    arch = gguf.MODEL_ARCH[ARCHS[d["model_type"]]]
    name_map = gguf.get_tensor_name_map(arch, d["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    heads, kv_heads = d["num_attention_heads"], d["num_key_value_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    rope = d.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    writer.add_name(model_dir.name)
    writer.add_context_length(d["max_position_embeddings"])
    writer.add_embedding_length(d["hidden_size"])
    writer.add_block_count(d["num_hidden_layers"])
    writer.add_feed_forward_length(d["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(d["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_bos_token_id(d["bos_token_id"])
    writer.add_eos_token_id(d["eos_token_id"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if d.get("sliding_window") and d["model_type"].startswith("gemma"):
        writer.add_sliding_window(d["sliding_window"])
    if d["model_type"] == "gemma2":
        writer.add_attn_logit_softcapping(d["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(d["final_logit_softcapping"])
    qtype = gguf.GGMLQuantizationType[quant]
    writer.add_file_type({"F32": 0, "Q8_0": 7, "Q4_0": 2}[quant])
    tensors = load_file(str(model_dir / "model.safetensors"))
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(d))
    for hf_name, value in tensors.items():
        value = value.float()
        if d["model_type"] in ("llama", "mistral") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _permute(value, heads if "q_proj" in hf_name else kv_heads)
        if d["model_type"].startswith("gemma") and hf_name.endswith("norm.weight"):
            value = value + 1
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = value.numpy()
        if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
