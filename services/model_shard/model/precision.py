"""What `--dtype auto` and `--quantization auto` mean on this machine, with the reason for each choice.

- dtype: bfloat16 where the hardware computes it natively (a CUDA device with bf16, else float16 on
  CUDA; a CPU with AVX512-BF16 or AMX), float32 elsewhere, where bfloat16 would be emulated and slower.
- quantization: the precision the checkpoint was published in (the GGUF shipped beside the converted
  weights names it), when a native kernel for it runs here; otherwise none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# GGUF file types (general.file_type) by the quantization that serves them.
_GGUF_INT4 = {2, 3, 14, 15}  # Q4_0, Q4_1, Q4_K_S, Q4_K_M
_GGUF_INT8 = {7}  # Q8_0


@dataclass(frozen=True)
class Choice:
    value: str | None
    reason: str


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def resolve_dtype(requested: str) -> Choice:
    if requested != "auto":
        return Choice(requested, "asked for")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Choice("bfloat16", "the CUDA device computes bfloat16")
        return Choice("float16", "the CUDA device has no bfloat16")
    native = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    if native:
        return Choice("bfloat16", f"the CPU computes bfloat16 natively ({', '.join(sorted(native))})")
    return Choice("float32", "the CPU has no native bfloat16 (AVX512-BF16 or AMX), where it would be emulated")


def published_quantization(model_dir: str | Path) -> str | None:
    """int4 / int8 when the checkpoint's GGUF was published at that precision, else None."""
    ggufs = sorted(Path(model_dir).glob("*.gguf"))
    if not ggufs:
        return None
    import gguf

    field = gguf.GGUFReader(ggufs[0]).fields.get("general.file_type")
    if field is None:
        return None
    file_type = int(field.parts[field.data[0]][0])
    return "int4" if file_type in _GGUF_INT4 else "int8" if file_type in _GGUF_INT8 else None


def resolve_quantization(requested: str | None, model_dir: str | Path, dtype: str, native_kernels: bool) -> Choice:
    """requested: "auto", "none", "int8" or "int4"."""
    if requested != "auto":
        return Choice(None if requested in (None, "", "none") else requested, "asked for")
    published = published_quantization(model_dir)
    if published is None:
        return Choice(None, "the checkpoint was not published quantized")
    from services.model_shard.model import native

    if dtype == "float32" or not native_kernels or torch.cuda.is_available() or not native.vnni_supported():
        return Choice(None, f"the checkpoint was published {published}, but no native {published} kernel runs "
                            f"here (it needs a CPU with AVX-512 VNNI, the native kernels and bfloat16 activations)")
    return Choice(published, f"the checkpoint was published {published} and the native kernels run it here")
