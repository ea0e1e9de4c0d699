"""The batched sampler against plain definitions: its random stream, its distributions (chi-square
on a tiny vocabulary), and every parameter at its extremes."""

from __future__ import annotations

import math

import pytest
import torch

from services.model_shard.engine import sampler
from services.model_shard.engine.request import SamplingParams, Sequence
from services.model_shard.engine.sampler import SamplingBatch, sample, seed_as_int64, uniform_draws

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
# Critical values of chi-square at p = 1e-4: a correct sampler fails one run in ten thousand, and
# these runs are seeded, so a pass is reproducible.
CHI2_CRITICAL = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


def _splitmix64(seed: int, index: int) -> float:
    """The index-th output of SplitMix64 seeded with seed, as a double in [0, 1): the reference."""
    mask = (1 << 64) - 1
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) / (1 << 53)


def _seq(params: SamplingParams, seed: int, output: list[int] | None = None, prompt=(1, 2, 3)) -> Sequence:
    return Sequence("r", list(prompt), params, frozenset(), seed_as_int64(seed), output_token_ids=list(output or []))


def _sample(logits: torch.Tensor, seqs: list[Sequence]):
    return sample(logits.clone(), SamplingBatch.from_sequences(seqs))


def _reference(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The kept distribution by the definitions in sampler.py, with a full sort."""
    probs = (logits.double() / temperature).softmax(-1)
    if min_p:
        probs = torch.where(probs < min_p * probs.max(), 0.0, probs)
    values, ids = probs.sort(descending=True)
    if top_k:
        values[top_k:] = 0
    before = values.cumsum(0) - values
    values = torch.where(before < top_p * values.sum(), values, 0.0)
    kept = torch.zeros_like(probs).scatter(0, ids, values)
    return kept / kept.sum()


def test_the_random_stream_is_splitmix64_by_seed_and_draw_index():
    seeds = [0, 1, 42, 2**63 - 1, 2**63, 2**64 - 1]
    for index in (0, 1, 7, 1000):
        got = uniform_draws(torch.tensor([seed_as_int64(s) for s in seeds]), torch.full((len(seeds),), index))
        assert got.tolist() == [_splitmix64(s, index) for s in seeds]


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0, top_k=3), dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.2), dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
])
def test_draws_follow_the_defined_distribution(params):
    rows = 20000
    seqs = [_seq(SamplingParams(max_tokens=1, **params), seed) for seed in range(rows)]
    tokens = torch.tensor(_sample(LOGITS.expand(rows, -1), seqs).tokens)
    expected = _reference(LOGITS, **{k: v for k, v in params.items()})
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert counts[expected == 0].sum() == 0, "a token the filters drop was drawn"
    kept = expected > 0
    chi2 = float(((counts[kept] - rows * expected[kept]) ** 2 / (rows * expected[kept])).sum())
    assert chi2 < CHI2_CRITICAL[int(kept.sum()) - 1], (chi2, counts.tolist(), (rows * expected).tolist())


def test_a_nucleus_wider_than_the_candidates_is_sorted_in_full(monkeypatch):
    monkeypatch.setattr(sampler, "CANDIDATES", 2)  # every top-p row below needs more than two tokens
    rows = 20000
    seqs = [_seq(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9), seed) for seed in range(rows)]
    tokens = torch.tensor(_sample(LOGITS.expand(rows, -1), seqs).tokens)
    expected = _reference(LOGITS, top_p=0.9)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    kept = expected > 0
    assert int(kept.sum()) > 2 and counts[~kept].sum() == 0
    chi2 = float(((counts[kept] - rows * expected[kept]) ** 2 / (rows * expected[kept])).sum())
    assert chi2 < CHI2_CRITICAL[int(kept.sum()) - 1]


def test_a_row_draws_the_same_token_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(32, 1000) * 3
    mixed = [SamplingParams(max_tokens=9, temperature=0.1 + i / 10, top_k=(0, 5, 50)[i % 3],
                            top_p=(1.0, 0.9, 0.5)[i % 3], min_p=(0.0, 0.1)[i % 2],
                            repetition_penalty=(1.0, 1.3)[i % 2]) for i in range(32)]
    seqs = [_seq(p, 1000 + i, output=list(range(i))) for i, p in enumerate(mixed)]
    together = _sample(logits, seqs).tokens
    alone = [_sample(logits[i : i + 1], [seqs[i]]).tokens[0] for i in range(32)]
    assert together == alone
    # The draw index moves with the tokens made so far: a resumed request (skip_draws) continues it.
    resumed = _seq(SamplingParams(max_tokens=9, temperature=1.0, skip_draws=3), 5, output=[7])
    undisturbed = _seq(SamplingParams(max_tokens=9, temperature=1.0), 5, output=[1, 2, 3, 4])
    assert _sample(logits[:1], [resumed]).tokens == _sample(logits[:1], [undisturbed]).tokens


@pytest.mark.parametrize("extreme", [
    dict(temperature=1e-45), dict(temperature=1e-40), dict(temperature=0.0), dict(temperature=1e-5),
    dict(temperature=100.0), dict(temperature=3e38), dict(temperature=1.0, repetition_penalty=1e-45),
    dict(temperature=0.0, repetition_penalty=1e-45), dict(temperature=1.0, repetition_penalty=3e38),
    dict(temperature=1.0, top_k=2**32 - 1), dict(temperature=1.0, top_p=1e-45), dict(temperature=1.0, min_p=1.0),
    dict(temperature=1e-45, top_p=1e-45, min_p=1.0, top_k=1, repetition_penalty=1e-45),
])
def test_every_extreme_value_samples_a_token_and_leaves_the_other_rows_alone(extreme):
    torch.manual_seed(1)
    logits = torch.randn(3, 300) * 5
    normal = [_seq(SamplingParams(max_tokens=4, temperature=0.8, top_p=0.95, seed=3), 3, prompt=(5, 6)),
              _seq(SamplingParams(max_tokens=4), 0, prompt=(5, 6))]
    odd = _seq(SamplingParams(max_tokens=4, **extreme), 11, prompt=(5, 6, 7))
    out = _sample(logits, [normal[0], odd, normal[1]])
    assert out.failed == [None, None, None]
    assert 0 <= out.tokens[1] < 300
    assert [out.tokens[0], out.tokens[2]] == [_sample(logits[i : i + 1], [s]).tokens[0]
                                             for i, s in zip((0, 2), normal)]
    if extreme.get("temperature", 0) < sampler.TEMPERATURE_FLOOR and extreme.get("repetition_penalty", 1) == 1:
        assert out.tokens[1] == int(logits[1].argmax())  # below the floor is greedy


def test_tiny_repetition_penalty_makes_seen_tokens_win():
    logits = torch.zeros(1, 50)
    logits[0, 9] = 0.5
    logits[0, 40] = 5.0
    out = _sample(logits, [_seq(SamplingParams(max_tokens=2, repetition_penalty=1e-45), 0, prompt=(9,))])
    assert out.tokens == [9]


def test_a_row_with_nan_logits_fails_alone():
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    logits[1, 17] = float("nan")
    logits[2] = float("-inf")  # every token masked
    seqs = [_seq(SamplingParams(max_tokens=2, temperature=t, seed=1), 1) for t in (0.0, 1.0, 0.7, 1.0)]
    out = _sample(logits, seqs)
    assert out.failed[0] is None and out.failed[3] is None
    assert "not finite" in out.failed[1] and "not finite" in out.failed[2]
    assert out.tokens[0] == int(logits[0].argmax())
    assert out.tokens[3] == _sample(logits[3:4], seqs[3:4]).tokens[0]


def test_logprobs_are_the_raw_distributions():
    logits = LOGITS.unsqueeze(0)
    out = _sample(logits, [_seq(SamplingParams(max_tokens=1, logprobs=True), 0)])
    assert out.tokens == [0]
    assert math.isclose(out.logprobs[0], float(LOGITS.log_softmax(-1)[0]), rel_tol=1e-6)
    assert out.top_logprobs is None  # nobody asked for alternatives


def test_top_logprobs_are_the_processed_distribution_or_the_raw_one():
    """Processed: after repetition/presence/frequency penalties, logit bias and held-back end tokens, at
    temperature 1 (the module's docstring); raw: the logits as the model made them."""
    common = dict(max_tokens=4, temperature=0.7, seed=5, logprobs=True, top_logprobs=3, repetition_penalty=1.3,
                  presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((6, 4.0),), min_tokens=3)
    output = [1, 1, 2]
    seqs = [_seq(SamplingParams(**common), 9, output[:2]),
            _seq(SamplingParams(**common, raw_logprobs=True), 9, output[:2]),
            _seq(SamplingParams(max_tokens=4), 0)]  # no logprobs: pays nothing, reports nothing
    seqs[0].eos_token_ids = seqs[1].eos_token_ids = frozenset({7})
    logits = torch.stack([LOGITS, LOGITS, LOGITS])
    out = _sample(logits, seqs)
    # The reference, by the OpenAI and CTRL definitions over plain Python numbers.
    seen, generated = {1, 2, 3} | set(output[:2]), output[:2]
    processed = []
    for token, value in enumerate(LOGITS.tolist()):
        if token in seen:
            value = value / 1.3 if value > 0 else value * 1.3
        count = generated.count(token)
        value -= 0.25 * count + (0.5 if count else 0.0)
        value += 4.0 if token == 6 else 0.0
        processed.append(float("-inf") if token == 7 else value)
    expected = {"processed": torch.tensor(processed).log_softmax(-1), "raw": LOGITS.log_softmax(-1)}
    for row, kind in ((0, "processed"), (1, "raw")):
        reference = expected[kind]
        assert out.tokens[row] == out.tokens[0]  # same seed, same sampling: only the report differs
        assert out.logprobs[row] == pytest.approx(float(reference[out.tokens[row]]), abs=1e-5)
        ids, values = out.top_logprobs[row]
        ref_values, ref_ids = reference.topk(3)
        assert ids == ref_ids.tolist() and values == pytest.approx(ref_values.tolist(), abs=1e-5)
    assert out.logprobs[2] is None and out.top_logprobs[2] is None


def test_top_logprobs_are_bounded_and_need_logprobs():
    with pytest.raises(ValueError, match="top_logprobs must be in"):
        SamplingParams(max_tokens=1, logprobs=True, top_logprobs=21).validate()
    with pytest.raises(ValueError, match="needs logprobs"):
        SamplingParams(max_tokens=1, top_logprobs=2).validate()


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("temperature", -1.0), ("top_p", float("nan")), ("top_p", 0.0),
                                         ("min_p", float("nan")), ("min_p", 1.5), ("repetition_penalty", 0.0),
                                         ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
                                         ("top_k", -1), ("seed", 2**64)])
def test_meaningless_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=1, **{field: value}).validate()


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens():
    logits = torch.zeros(2, 10)
    params = SamplingParams(max_tokens=9, presence_penalty=0.5, frequency_penalty=0.25)
    seqs = [_seq(params, 0, output=[3, 3, 3, 7], prompt=(1, 1, 1)), _seq(SamplingParams(max_tokens=9), 0, output=[3])]
    batch = SamplingBatch.from_sequences(seqs)
    adjusted = logits.clone()
    sampler.apply_additive(adjusted, batch)
    expected = torch.zeros(2, 10)
    expected[0, 3] = -(0.5 + 3 * 0.25)  # three occurrences
    expected[0, 7] = -(0.5 + 0.25)
    assert torch.equal(adjusted, expected)  # the prompt's tokens (1) and the other row are untouched


def test_logit_bias_and_held_back_end_tokens():
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    forced = SamplingParams(max_tokens=4, logit_bias=((17, 100.0),))
    banned = SamplingParams(max_tokens=4, temperature=1.0, seed=1, logit_bias=tuple((t, -100.0) for t in range(49)))
    eos = int(logits[2].argmax())
    held = Sequence("r", [1], SamplingParams(max_tokens=4, min_tokens=2), frozenset({eos}), 0)
    out = _sample(logits, [_seq(forced, 0), _seq(banned, 1), held])
    assert out.tokens[:2] == [17, 49]
    assert out.tokens[2] != eos and out.tokens[2] == int(logits[2].topk(2).indices[1])  # EOS is held back
    held.output_token_ids.extend([5, 6])  # min_tokens reached: the end token may come now
    assert _sample(logits[2:], [held]).tokens == [eos]
