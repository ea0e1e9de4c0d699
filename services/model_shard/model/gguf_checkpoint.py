"""A GGUF file (llama.cpp's format) opened as a checkpoint folder: config.json from its metadata,
model.safetensors from its tensors under Hugging Face's names, its tokenizer, and the GGUF itself
beside them (a link), converted once and reused by every later start.

Supported: the GGUF architectures llama (Llama 1-3, Mistral), qwen2, qwen3, gemma2 and gemma3, with
the conventions of llama.cpp's convert_hf_to_gguf.py undone: q/k rows permuted for llama's rotary
layout, Gemma's norms stored as 1 + weight, Llama 3's RoPE scaling as a rope_freqs tensor. Blocks of
every quantized type the gguf package dequantizes are dequantized at load; the file's type then
decides `--quantization auto` (precision.py), which re-quantizes Q4 / Q8_0 files for the native
int4 / int8 kernels. Another architecture or tensor type is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from services.model_shard.model.families import UnsupportedModel

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                 "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
                 "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
# llama.cpp's per-layer tensor names -> Hugging Face's (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma's four norms per layer: llama.cpp's ffn_norm is its pre-feedforward norm.
GEMMA_LAYER_TENSORS = {**LAYER_TENSORS, "post_attention_norm": "post_attention_layernorm",
                       "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix == ".gguf" and Path(path).is_file()


def open_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint folder of a GGUF file, converted on first use. cache_dir: where converted files
    are kept (default: beside the file; where that is read-only, ~/.cache/llm-mesh/gguf, else the
    temporary directory, e.g. a pod's emptyDir)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.blake2b(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    roots = [Path(cache_dir)] if cache_dir else [path.parent, Path.home() / ".cache" / "llm-mesh" / "gguf",
                                                 Path(tempfile.gettempdir()) / "llm-mesh-gguf"]
    for root in roots:
        out = root / f".{path.stem}.{key}"
        if (out / "config.json").exists():
            return out
    root = next((r for r in roots if _writable(r)), None)
    if root is None:
        raise OSError(f"nowhere to convert {path.name} into: none of {', '.join(map(str, roots))} is writable")
    out = root / f".{path.stem}.{key}"
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=root) as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        convert_gguf(path, staging)
        try:
            staging.rename(out)  # atomic: a half-converted folder never looks ready
        except OSError:
            if not (out / "config.json").exists():  # not another process's finished conversion
                raise
    return out


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)


def convert_gguf(path: Path, out: Path) -> None:
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(path)
    config = gguf_config(reader)
    tensors = gguf_tensors(reader, config)
    rope_freqs = tensors.pop("rope_freqs", None)
    if rope_freqs is not None:
        config["rope_parameters"] = llama3_rope(rope_freqs, config)
    log.info("converting %s (%s, %d tensors) into %s", path.name, config["architectures"][0], len(tensors), out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / path.name).symlink_to(path)  # its file type decides --quantization auto (precision.py)
    _save_tokenizer(path, reader, out)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    values = [field.parts[i] for i in field.data]
    if field.types and field.types[0].name == "STRING":
        return bytes(values[0]).decode()
    return values[0][0].item() if len(values) == 1 else [v[0].item() for v in values]


def gguf_config(reader) -> dict:
    """config.json of a GGUF's metadata, as transformers names the fields."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
                               f"{', '.join(ARCHITECTURES)}")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length") or hidden // heads
    architecture, model_type = ARCHITECTURES[arch]
    d = dict(architectures=[architecture], model_type=model_type, vocab_size=int(embd.shape[1]),
             hidden_size=hidden, intermediate_size=get("feed_forward_length"), num_hidden_layers=get("block_count"),
             num_attention_heads=heads, num_key_value_heads=get("attention.head_count_kv") or heads,
             head_dim=head_dim, rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
             rope_theta=get("rope.freq_base", 10000.0), max_position_embeddings=get("context_length", 2048),
             tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
             bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
             eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear" or arch.startswith("gemma2"):
            raise UnsupportedModel(f"GGUF {arch}: rope.scaling.type {scaling!r} is not supported (only linear)")
    rope = ({"rope_type": "linear", "factor": get("rope.scaling.factor"), "rope_theta": d["rope_theta"]}
            if scaling == "linear" else {"rope_type": "default", "rope_theta": d["rope_theta"]})
    d["rope_parameters"] = rope
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales attention by head_dim ** -0.5, except for the 27B models (hidden / heads).
        big = d["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
        d.update(hidden_activation="gelu_pytorch_tanh", sliding_window=get("attention.sliding_window"),
                 query_pre_attn_scalar=hidden // heads if big else head_dim)
    if arch == "gemma2":
        d.update(attn_logit_softcapping=get("attn_logit_softcapping"),
                 final_logit_softcapping=get("final_logit_softcapping"))
    if arch == "gemma3":  # llama.cpp's: five sliding layers to one full one, the local base 10 000
        d["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                            for i in range(d["num_hidden_layers"])]
        d["rope_parameters"] = {"full_attention": rope,
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return d


def gguf_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """The tensors under Hugging Face's names, dequantized to float32, llama.cpp's conventions undone."""
    from gguf import GGMLQuantizationType, dequantize

    gemma = config["model_type"].startswith("gemma")
    layer_names = GEMMA_LAYER_TENSORS if gemma else LAYER_TENSORS
    out = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        parts = base.split(".")
        if base == "rope_freqs":
            name = "rope_freqs"
        elif parts[0] == "blk" and len(parts) == 3 and parts[2] in layer_names:
            name = f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
        elif base in TOP_TENSORS:
            name = f"{TOP_TENSORS[base]}.{kind}"
        else:
            raise UnsupportedModel(f"GGUF tensor {t.name!r} has no place in the {config['architectures'][0]} decoder")
        try:
            values = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError):
            qtype = GGMLQuantizationType(t.tensor_type).name
            raise UnsupportedModel(f"GGUF tensor {t.name!r} is of type {qtype}, which cannot be dequantized here; "
                                   f"re-quantize the file to F32, F16, BF16, Q8_0, Q4_0, Q4_1 or a K-quant") from None
        value = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(
            tuple(int(n) for n in reversed(t.shape)))
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            value = _unpermute(value, heads)
        if gemma and name.endswith("norm.weight"):
            value = value - 1.0
        out[name] = value
    return out


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permute undone: each head's rows back from halves to interleaved pairs."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope(factors: torch.Tensor, config: dict) -> dict:
    """Llama 3's RoPE parameters from the per-frequency factors convert_hf_to_gguf.py stores (with
    low_freq_factor 1 and high_freq_factor 4, as every Llama 3.x publishes); other factors are refused."""
    theta, dim = config["rope_theta"], config["head_dim"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = float(factors.max()), 1.0, 4.0
    wavelens = (2 * math.pi / freqs).tolist()
    smooth = [(w, float(f)) for w, f in zip(wavelens, factors) if 1.0 < f < factor]
    # The original context from a factor between 1 and `factor`; without one, any context between the
    # last unscaled and the first scaled wavelength gives the same factors, hence the same rotation.
    candidates = [round(w * (high - low) * (1 / f - 1 / factor) / (1 - 1 / factor) + w * low) for w, f in smooth[:1]]
    steps = [i for i in range(len(wavelens) - 1) if factors[i] == 1.0 and factors[i + 1] == factor]
    candidates += [round((high * wavelens[i] + low * wavelens[i + 1]) / 2) for i in steps[:1]]
    for original in candidates or [8192]:
        params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                  "high_freq_factor": high, "original_max_position_embeddings": original}
        if torch.allclose(_llama3_factors(freqs, params), factors.double(), rtol=1e-4):
            return params
    raise UnsupportedModel("GGUF tensor rope_freqs holds RoPE factors that are not Llama 3's (low_freq_factor 1, "
                           "high_freq_factor 4); such a file is not supported")


def _llama3_factors(freqs: torch.Tensor, p: dict) -> torch.Tensor:
    """The factors as convert_hf_to_gguf.py computes them for rope_type llama3."""
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / p["low_freq_factor"], old / p["high_freq_factor"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(p["factor"])
        else:
            smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return torch.tensor(out, dtype=torch.float64)


def _save_tokenizer(path: Path, reader, out: Path) -> None:
    """The GGUF's own tokenizer as tokenizer.json (+ its chat template), through transformers' GGUF
    converter; a file without one, or no transformers here, leaves the folder without a tokenizer
    (the tokenizer service then refuses the folder by name)."""
    if "tokenizer.ggml.model" not in reader.fields:
        log.warning("%s carries no tokenizer", path.name)
        return
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("%s: its tokenizer is converted with transformers, which is not installed here "
                    "(pip install 'llm-mesh[convert]')", path.name)
        return
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    # What the tokenizer service reads that the converter may leave out: the template and special tokens.
    template = _field(reader, "tokenizer.chat_template")
    if template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(template)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not config.get(f"{role}_token"):
            config[f"{role}_token"] = tokenizer.convert_ids_to_tokens(token_id)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
