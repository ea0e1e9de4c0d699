"""Speculative decoding: the same tokens with it on or off (greedy, seeded, constrained), the same
distribution for unseeded sampling, proposals only from the request's own scope, the pool idle after."""

from __future__ import annotations

import json
import random

import pytest
import torch

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.grammar import OutputSpec
from services.model_shard.engine.proposers import AnswerStore, NgramIndex
from services.model_shard.engine.request import SamplingParams
from services.model_shard.engine.speculative import SpeculativeConfig, Speculator, accepted_prefix
from services.model_shard.model.llama import load_model
from services.tokenizer.text import Message, TextTokenizer

PARAGRAPH = ("The river wound slowly through the valley, past fields of wheat and small stone houses. In the "
             "morning the farmers walked to the market in the town, carrying baskets of bread, cheese and apples.")
RECORD = '{"name": "Alice Smith", "city": "Paris", "age": 31}'
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                           "age": {"type": "integer"}}, "required": ["name", "city", "age"]}


def test_ngram_index_proposes_what_followed_the_latest_match():
    index = NgramIndex(2, 3)
    assert index.propose([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]
    assert index.propose([1, 2, 3, 4, 9, 2, 3, 4, 7, 3, 4], 3) == [7, 3, 4]  # the later occurrence wins
    assert NgramIndex(2, 3).propose([5, 6, 7], 4) == []
    assert accepted_prefix([4, 9, 1], [4, 9, 2, 8]) == 2 and accepted_prefix([4], [5, 4]) == 0


def test_answer_store_is_scoped_bounded_and_least_recently_used():
    store = AnswerStore(max_tokens=60, sizes=(4, 2), prompt_tail=4)
    prompt = [10, 11, 12, 13, 14]
    store.add(b"a", prompt, [20, 21, 22, 23])
    assert store.match(b"a", [8, 11, 12, 13, 14], 3) == (4, [20, 21, 22])  # the prompt's end proposes its answer
    assert store.match(b"a", [7, 21, 22], 5) == (2, [23])  # and any n-gram of it what followed
    assert store.match(b"b", [8, 11, 12, 13, 14], 3) == (0, [])  # never outside its scope
    store.add(b"a", prompt, [20, 21, 22, 23])  # the same answer again is one entry
    assert len(store) == 1 and store.num_tokens == 8
    for i in range(12):  # 8 tokens each: the bound keeps 7, the least recently used go first
        store.match(b"a", [8, 11, 12, 13, 14], 1)  # the first answer stays in use
        store.add(b"b", [100 + i] * 4, [200 + i] * 4)
    assert store.num_tokens <= 60
    assert store.match(b"a", [8, 11, 12, 13, 14], 1) == (4, [20])
    assert store.match(b"b", [100, 100, 100, 100], 1) == (0, [])  # evicted, and its index entries with it
    assert store.match(b"b", [111] * 4, 1) == (4, [211])


def _engine(model, method: str, **config) -> LLMEngine:
    return LLMEngine(model, EngineConfig(dtype="bfloat16", quantization="int4", kv_cache_bytes=64 << 20,
                                         speculative=SpeculativeConfig(method=method), **config))


@pytest.fixture(scope="module")
def model(real_model_dir):
    return load_model(real_model_dir, torch.bfloat16, "int4")


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return TextTokenizer(real_model_dir)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40),
                                    SamplingParams(max_tokens=40, temperature=0.8, seed=7, repetition_penalty=1.1,
                                                   logprobs=True, top_logprobs=2)], ids=["greedy", "seeded"])
def test_tokens_are_the_same_with_speculation_on_or_off(model, tok, params, method):
    """Alone, batched, in 24-token prefill chunks, and with the prompts' prefixes reused from the cache."""
    prompts = [tok.encode_chat([Message("user", f"Repeat this text exactly: {PARAGRAPH}")]),
               tok.encode_chat([Message("user", "Write a haiku about rain.")])]

    def run(method: str) -> tuple[list, LLMEngine]:
        engine = _engine(model, method, max_batched_tokens=24)
        return [engine.generate([p], params)[0] for p in prompts] + [engine.generate(prompts, params)], engine

    plain, _ = run("off")
    drafted, engine = run(method)
    assert drafted == plain
    stats = engine.scheduler.speculator.stats
    assert stats["ngram"].accepted > 0
    if method == "suffix":  # the batched run's answers were given before
        assert stats["suffix"].accepted > 0
    assert engine.pool.num_free == engine.pool.num_blocks  # rejected proposals' blocks were given back
    if params.temperature == 0:
        assert engine.stats.steps < sum(len(t) for t in plain[:2]) + len(plain[2][0])  # tokens came several a step


def test_earlier_answers_are_proposed_only_within_their_scope(model, tok):
    prompt = tok.encode_chat([Message("user", "What are your opening hours on Sundays?")])
    engine = _engine(model, "suffix")
    params = SamplingParams(max_tokens=30)

    def ask(scope: bytes, rid: str) -> list[int]:
        seq = engine.add_request(rid, prompt, params, answer_scope=scope)
        while engine.has_work:
            engine.step()
        return seq.output_token_ids

    stats = engine.scheduler.speculator.stats
    first = ask(b"tenant-a", "a1")
    assert "suffix" not in stats
    assert ask(b"tenant-b", "b1") == first  # another tenant: nothing of tenant-a's is proposed
    assert "suffix" not in stats
    assert ask(b"tenant-a", "a2") == first  # its own tenant again: its earlier answer is proposed
    assert stats["suffix"].accepted >= len(first) // 2


def test_constrained_answers_speculate_under_each_position_s_mask(model, tok, real_model_dir):
    """A JSON answer copied from the prompt: proposals cut to what the grammar allows, every checked
    position under its own mask; the same tokens as without speculation, and valid."""
    prompt = tok.encode_chat([Message("user", f"Return this record as JSON, exactly: {RECORD}")])
    params = SamplingParams(max_tokens=60, structured=OutputSpec("json_schema", json.dumps(SCHEMA)))

    def run(method: str) -> tuple[list[list[int]], LLMEngine]:
        engine = _engine(model, method)
        engine.enable_grammars(real_model_dir)
        return [engine.generate([prompt], params)[0] for _ in range(2)], engine

    plain, _ = run("off")
    drafted, engine = run("suffix")
    assert drafted == plain
    assert json.loads(tok.decode(plain[0])).keys() == SCHEMA["properties"].keys()
    assert engine.scheduler.speculator.totals().accepted > 0
    assert engine.pool.num_free == engine.pool.num_blocks


class _OftenWrong:
    """Proposes the likeliest first token, then tokens at random: accepted sometimes, rejected mostly."""

    name = "test"

    def __init__(self, first: int, vocab: int):
        self.first, self.vocab, self.rng = first, vocab, random.Random(0)

    def propose(self, seq, k):
        tokens = [self.first] + [self.rng.randrange(self.vocab) for _ in range(k - 1)]
        return self.name, tokens[:k]

    def finished(self, seq):
        pass


def _chi_square_p(observed: list[int], probs: list[float]) -> float:
    """Pearson's test of counts against probabilities, cells with under 5 expected merged."""
    n = sum(observed)
    cells, obs, exp = [], 0, 0.0
    for o, p in sorted(zip(observed, probs), key=lambda c: c[1]):
        obs, exp = obs + o, exp + n * p
        if exp >= 5:
            cells.append((obs, exp))
            obs, exp = 0, 0.0
    if exp and cells:
        o, e = cells.pop()
        cells.append((o + obs, e + exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_unseeded_sampling_keeps_the_model_s_distribution(tmp_path):
    """A 16-token vocabulary and a proposer that is mostly wrong: the first three tokens' frequencies
    over 2 000 unseeded answers match the model's own probabilities (transformers', fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    vocab = 16
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(40)  # peaked enough that the likeliest token is often right
    hf.save_pretrained(tmp_path)
    prompt = [0, 5, 9, 3]
    with torch.no_grad():
        paths = torch.tensor([[*prompt, a, b] for a in range(vocab) for b in range(vocab)])
        probs = hf(paths).logits.float().softmax(-1)  # [256, 6, vocab]
    p1 = probs[0, 3]
    p12 = p1[:, None] * probs[::vocab, 4]  # [a, b]
    p3 = (p12.flatten()[:, None] * probs[:, 5]).sum(0)
    expected = [p1, p12.sum(0), p3]

    engine = LLMEngine(load_model(tmp_path, torch.float32), EngineConfig(
        dtype="float32", kv_cache_bytes=32 << 20, max_running=256, max_waiting=4096, max_batched_tokens=2048,
        speculative=SpeculativeConfig(method="ngram", num_tokens=3, max_decoding=256)))
    wrong = _OftenWrong(int(p1.argmax()), vocab)
    engine.scheduler.speculator = Speculator(engine.config.speculative, proposer=wrong)
    random.seed(1)  # the unseeded requests' random streams: a fixed draw of them, so the test is repeatable
    answers = engine.generate([prompt] * 2000, SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True))
    stats = engine.scheduler.speculator.stats["test"]
    assert stats.checks > 800 and 0 < stats.accepted < stats.proposed / 2
    for position, probs_at in enumerate(expected):
        counts = [0] * vocab
        for answer in answers:
            counts[answer[position]] += 1
        assert _chi_square_p(counts, probs_at.tolist()) > 1e-3, (position, counts)

