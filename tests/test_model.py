"""Our serving Llama against transformers' LlamaForCausalLM: same logits, through the paged cache."""

from __future__ import annotations

import pytest
import torch

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams
from services.model_shard.model.evaluate import prompt_logits
from services.model_shard.model import native
from services.model_shard.model.llama import load_model

from .conftest import hf_reference


def test_tiny_llama_logits_match_transformers(tiny_model_dir):
    ours = load_model(tiny_model_dir)
    ref = hf_reference(tiny_model_dir)
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = prompt_logits(ours, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_real_model_logits_match_transformers(real_model_dir):
    ours = load_model(real_model_dir)
    ref = hf_reference(real_model_dir)
    ids = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = prompt_logits(ours, ids)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native-attention", "torch-attention"])
def test_paged_greedy_decode_matches_transformers_generate(tiny_model_dir, native_kernels):
    """Prefill then decode step by step through the paged cache (block size 4 forces many blocks),
    with decode attention on the native paged kernel and on stock torch ops."""
    ref = hf_reference(tiny_model_dir)
    model = load_model(tiny_model_dir, native_kernels=native_kernels)
    assert model.layers[0].self_attn.native is (native_kernels and native.available())
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    prompts = [[5, 17, 99, 3, 42, 8, 8, 1, 200, 31], [7, 7, 7], [250, 1, 2, 3, 4, 5, 6, 7, 9]]
    got = engine.generate(prompts, SamplingParams(max_tokens=12))
    for prompt, tokens in zip(prompts, got):
        with torch.inference_mode():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        # The engine stops at EOS (id 2); transformers was told not to.
        assert tokens == expected[: len(tokens)]
        assert len(tokens) == 12 or tokens[-1] == 2
