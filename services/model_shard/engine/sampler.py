"""Sampling over a batch of logits: every row's parameters as tensors, no Python loop over rows.

What each parameter means, in the order applied (each row on its own):

1. repetition_penalty (CTRL): the logits of tokens already in the sequence (prompt and output) are
   divided by it where positive, multiplied where negative. The result is clamped to ±MAX_LOGIT, so
   a tiny penalty makes seen tokens overwhelmingly likely instead of infinite. Then OpenAI's
   presence_penalty (subtracted once from each generated token's logit) and frequency_penalty (once per
   occurrence), then logit_bias (added), clamped again; then the end tokens held back by min_tokens
   become -inf, and so do the tokens a constrained row's grammar does not allow next (grammar.py).
   Greedy rows see all of these too.
2. A temperature below TEMPERATURE_FLOOR (0 included) is greedy: the argmax of the penalised logits.
   Otherwise the logits are divided by it and soft-maxed.
3. min_p drops tokens whose probability is below min_p times the most likely token's.
4. top_k keeps the k most likely tokens; top_p then keeps the smallest prefix of them, most likely
   first, whose probability mass (renormalised over what is left) reaches top_p. Both are found among
   the CANDIDATES most likely tokens (torch.topk, no full sort); a top_p row whose nucleus does not fit
   among them is re-done over 4 times as many, and so on up to the fully sorted vocabulary, so the
   result is exact either way.
5. One draw picks the token by inverting the kept distribution's cumulative sum.

Randomness is counter-based: a row's draw is SplitMix64 of (its seed, the index of the draw), turned
into a uniform double. The index of a draw is the number of tokens the request generated before it
(plus those generated elsewhere before a resume), so a seeded request gets the same tokens whatever
else shares its batch, whichever step or replica makes them, with no generator state to keep or
replay. A request without a seed gets a random one when it arrives.

A row whose logits hold NaN, or whose every token is masked, cannot be sampled: it is reported in
`failed` and the other rows of the batch are unaffected.

Log-probabilities (logprobs, top_logprobs) describe, by default, the distribution of step 1's output
at temperature 1: the model's logits after the penalties, the logit bias and the held-back end tokens
(-inf), before temperature, min_p and top-k/top-p. A row with raw_logprobs gets the model's own
distribution instead. Both are computed only for the rows that ask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.model_shard.engine.grammar import apply_token_masks
from services.model_shard.engine.request import Sequence, TopLogprobs

TEMPERATURE_FLOOR = 1e-5  # below this a temperature means greedy: dividing by it would overflow
MAX_LOGIT = 1e30  # penalised logits are clamped here; divided by the floor it stays finite in float32
CANDIDATES = 64  # most likely tokens searched first for the top-k / top-p cut (then 4x more, ...)
CHUNK = 256  # a draw finds its chunk of the vocabulary first, then its token (_draw)

_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_draws(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1): the counter-th output of SplitMix64 seeded with each seed.
    seeds, counters: int64 [B]. int64 multiplication wraps, as the unsigned original does."""
    z = seeds + (counters + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def seed_as_int64(seed: int) -> int:
    return _signed64(seed)


@dataclass
class SamplingBatch:
    """The sampling parameters of a step's sampling rows, one entry per row."""

    temperature: torch.Tensor  # float32 [B]; TEMPERATURE_FLOOR or more where the row samples
    greedy: torch.Tensor  # bool [B]
    top_k: torch.Tensor  # int64 [B], 0: off
    top_p: torch.Tensor  # float32 [B], 1: off
    min_p: torch.Tensor  # float32 [B], 0: off
    seeds: torch.Tensor  # int64 [B]
    counters: torch.Tensor  # int64 [B]: the index of this draw in the request's stream
    repetition_penalty: torch.Tensor  # float32 [B], 1: off
    histories: list[list[int]] | None  # token ids seen by each row, where some row is penalised
    logprob_rows: list[int]  # rows that report their token's log-probability
    raw_logprob_rows: list[int] = ()  # of them, those that want the model's own distribution (by position)
    top_logprobs: list[int] = ()  # of them, how many alternatives each reports (by position)
    presence: torch.Tensor | None = None  # float32 [B], where some row has an OpenAI penalty
    frequency: torch.Tensor | None = None
    outputs: list[list[int]] | None = None  # the tokens each row generated, where some row has one
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, tokens, values), flat
    held_back: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens) that must not be picked now
    token_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, int32 bitmasks): grammar-constrained rows

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], masks: list | None = None) -> "SamplingBatch":
        """masks[i]: row i's allowed tokens (grammar.py), or None where it is unconstrained."""
        params = [s.params for s in seqs]
        constrained = [(i, m) for i, m in enumerate(masks or ()) if m is not None]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
        penalised = bool((penalty != 1.0).any())
        return cls(
            temperature=temperature.clamp(min=TEMPERATURE_FLOOR),
            greedy=temperature < TEMPERATURE_FLOOR,
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32),
            seeds=torch.tensor([s.draw_seed for s in seqs], dtype=torch.int64),
            counters=torch.tensor([p.skip_draws + len(s.output_token_ids) for s, p in zip(seqs, params)],
                                  dtype=torch.int64),
            repetition_penalty=penalty,
            histories=[s.token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)]
            if penalised else None,
            logprob_rows=[i for i, p in enumerate(params) if p.logprobs],
            raw_logprob_rows=[j for j, p in enumerate(p for p in params if p.logprobs) if p.raw_logprobs],
            top_logprobs=[p.top_logprobs for p in params if p.logprobs],
            token_masks=(torch.tensor([i for i, _ in constrained]), torch.stack([m for _, m in constrained]))
            if constrained else None,
            **_additive(seqs),
        )


def _flat(rows_and_items: list[tuple[int, list]]) -> tuple[torch.Tensor, list]:
    """Row indices repeated per item, and the items, over the rows that have some."""
    rows = torch.tensor([row for row, items in rows_and_items for _ in items], dtype=torch.int64)
    return rows, [item for _, items in rows_and_items for item in items]


def _additive(seqs: list[Sequence]) -> dict:
    """The OpenAI penalties, logit bias and held-back end tokens of a batch, for the rows that use them."""
    params = [s.params for s in seqs]
    out: dict = {}
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        out["presence"] = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)
        out["frequency"] = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)
        out["outputs"] = [s.generated_token_ids if p.presence_penalty or p.frequency_penalty else []
                          for s, p in zip(seqs, params)]
    biased = [(i, list(p.logit_bias)) for i, p in enumerate(params) if p.logit_bias]
    if biased:
        rows, pairs = _flat(biased)
        out["bias"] = (rows, torch.tensor([t for t, _ in pairs], dtype=torch.int64),
                       torch.tensor([b for _, b in pairs], dtype=torch.float32))
    held = [(i, list(held)) for i, s in enumerate(seqs) if (held := s.held_back_tokens())]
    if held:
        rows, tokens = _flat(held)
        out["held_back"] = (rows, torch.tensor(tokens, dtype=torch.int64))
    return out


def apply_additive(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place: OpenAI's presence/frequency penalties over each row's generated tokens, then logit bias,
    clamped to ±MAX_LOGIT; then held-back end tokens to -inf (they cannot be drawn at all)."""
    if batch.outputs is not None:
        rows, tokens = _flat(list(enumerate(batch.outputs)))
        vocab = logits.shape[-1]
        keys, counts = torch.unique(rows * vocab + torch.tensor(tokens, dtype=torch.int64), return_counts=True)
        rows, tokens = keys // vocab, keys % vocab
        logits[rows, tokens] -= batch.frequency[rows] * counts + batch.presence[rows]
    if batch.bias is not None:
        logits.index_put_(batch.bias[:2], batch.bias[2], accumulate=True)
    logits.clamp_(-MAX_LOGIT, MAX_LOGIT)
    if batch.held_back is not None:
        logits[batch.held_back] = float("-inf")


@dataclass
class SamplerOutput:
    tokens: list[int]
    logprobs: list[float | None]
    failed: list[str | None]  # why a row could not be sampled; None where it was
    top_logprobs: list[TopLogprobs | None] | None = None  # where some row asked


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top: list[int]) -> tuple[list[float],
                                                                                          list[TopLogprobs] | None]:
    """Per row of logits [R, V]: the log-probability of targets[r], and (where any top[r] > 0) the
    top[r] most likely tokens with theirs."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    k = max(top, default=0)
    if not k:
        return chosen, None
    values, ids = lp.topk(k, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return chosen, [(i[:n], v[:n]) for i, v, n in zip(ids, values, top)]


def apply_repetition_penalty(logits: torch.Tensor, histories: list[list[int]], penalty: torch.Tensor) -> None:
    """In place over [B, V]: each row's seen tokens penalised (see the module's docstring). Only
    the seen entries are read and written; a token seen twice is written twice with one value."""
    rows, seen = _flat(list(enumerate(histories)))
    seen = torch.tensor(seen, dtype=torch.int64)
    values = logits[rows, seen]
    factor = penalty[rows]
    penalised = torch.where(values > 0, values / factor, values * factor).clamp_(-MAX_LOGIT, MAX_LOGIT)
    logits[rows, seen] = penalised


def _nucleus(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, num: int):
    """The `num` most likely tokens of each row with what top-k / top-p keep of them.
    Returns (token ids [R, num], kept probabilities [R, num], exact [R]): a row is exact when its
    kept set lies within these candidates."""
    values, ids = probs.topk(num, dim=-1)
    ranks = torch.arange(num).unsqueeze(0)
    values = values.masked_fill(ranks >= torch.where(top_k > 0, top_k, num).unsqueeze(1), 0.0)
    # With top_k the row's whole mass is among the candidates; without, it is the row's full sum.
    total = torch.where(top_k > 0, values.sum(-1), probs.sum(-1))
    cumulative = values.cumsum(-1)
    keep = cumulative - values < top_p.unsqueeze(1) * total.unsqueeze(1)  # the first token always stays
    exact = (top_k > 0) | (cumulative[:, -1] >= top_p * total) | (num == probs.shape[-1])
    return ids, values * keep, exact


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of weights [R, N], the index where u times the row's total falls in its cumulative
    sum. In two levels (sums of chunks of CHUNK, then within the chosen chunk), so no pass over
    the whole row is a sequential scan."""
    rows, n = weights.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64)
    if n % CHUNK:
        weights = torch.nn.functional.pad(weights, (0, CHUNK - n % CHUNK))
    chunks = weights.view(rows, -1, CHUNK)
    per_chunk = chunks.sum(-1).to(torch.float64).cumsum(-1)
    target = uniforms * per_chunk[:, -1]
    chunk = torch.searchsorted(per_chunk, target.unsqueeze(1), right=True).clamp_(max=per_chunk.shape[1] - 1)
    before = torch.where(chunk > 0, per_chunk.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    inside = chunks.gather(1, chunk.unsqueeze(2).expand(-1, -1, CHUNK)).squeeze(1).to(torch.float64).cumsum(-1)
    offset = torch.searchsorted(inside, target.unsqueeze(1) - before, right=True).clamp_(max=CHUNK - 1)
    # Rounding can leave the target past a chunk's last positive weight: step back onto it.
    index = (chunk * CHUNK + offset).squeeze(1).clamp_(max=n - 1)
    zero = weights.gather(1, index.unsqueeze(1)).squeeze(1) <= 0
    if bool(zero.any()):
        last = (weights[zero] > 0).cumsum(-1).argmax(-1)  # the row's last token of positive weight
        index[zero] = last
    return index


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x's rows `rows` (x itself when that is all of them: no copy)."""
    return x if len(rows) == x.shape[0] else x.index_select(0, rows)


def _sample_rows(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> torch.Tensor:
    """Tokens for the sampling rows `rows` of logits (finite maxima checked by the caller)."""
    probs = _rows(logits, rows).div(batch.temperature[rows].unsqueeze(1)).softmax(dim=-1)
    min_p = batch.min_p[rows]
    if bool((min_p > 0).any()):
        floor = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < floor, 0.0)
    uniforms = uniform_draws(batch.seeds[rows], batch.counters[rows])
    top_k, top_p = batch.top_k[rows], batch.top_p[rows]
    filtered = (top_k > 0) | (top_p < 1.0)
    if not bool(filtered.any()):
        return _draw(probs, uniforms)
    tokens = torch.empty(len(rows), dtype=torch.int64)
    plain = (~filtered).nonzero().squeeze(1)
    if len(plain):
        tokens[plain] = _draw(_rows(probs, plain), uniforms[plain])
    todo = filtered.nonzero().squeeze(1)
    vocab = probs.shape[-1]
    num = min(vocab, max(CANDIDATES, int(top_k[todo].max())))
    while len(todo):  # wider candidate sets for the rows whose nucleus did not fit, up to all
        ids, kept, exact = _nucleus(_rows(probs, todo), top_k[todo], top_p[todo], num)
        done = exact.nonzero().squeeze(1)
        picked = _draw(kept.index_select(0, done), uniforms[todo[done]])
        tokens[todo[done]] = ids.index_select(0, done).gather(1, picked.unsqueeze(1)).squeeze(1)
        todo, num = todo[~exact], min(vocab, num * 4)
    return tokens


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: float32 [B, V], one row per request, the caller's to give up: penalties, bias and
    grammar masks are applied to it in place. A token for each row, its log-probability under the
    model's raw distribution for rows that asked, and the rows that could not be sampled."""
    raw = logits
    additive = batch.outputs is not None or batch.bias is not None or batch.held_back is not None
    if batch.raw_logprob_rows and (batch.histories is not None or additive or batch.token_masks is not None):
        logits = logits.clone()  # the model's own distribution is still wanted
    if batch.histories is not None:
        apply_repetition_penalty(logits, batch.histories, batch.repetition_penalty)
    if additive:
        apply_additive(logits, batch)
    if batch.token_masks is not None:
        apply_token_masks(logits, *batch.token_masks)
    best = logits.amax(dim=-1)  # NaN anywhere in a row makes its maximum NaN
    broken = best.isnan() | (best == float("-inf"))
    tokens = torch.zeros(len(best), dtype=torch.int64)
    greedy = (batch.greedy & ~broken).nonzero().squeeze(1)
    if len(greedy):
        tokens[greedy] = _rows(logits, greedy).argmax(dim=-1)
    sampling = (~batch.greedy & ~broken).nonzero().squeeze(1)
    if len(sampling):
        tokens[sampling] = _sample_rows(logits, batch, sampling)
    logprobs: list[float | None] = [None] * len(tokens)
    tops: list[TopLogprobs | None] | None = None
    if batch.logprob_rows:
        rows = torch.tensor(batch.logprob_rows)
        source = logits.index_select(0, rows)
        if batch.raw_logprob_rows:
            raw_rows = torch.tensor(batch.raw_logprob_rows)
            source[raw_rows] = raw.index_select(0, rows[raw_rows])
        chosen, top = token_logprobs(source, tokens[rows], list(batch.top_logprobs))
        for j, i in enumerate(batch.logprob_rows):
            logprobs[i] = chosen[j]
        if top is not None:
            tops = [None] * len(tokens)
            for j, i in enumerate(batch.logprob_rows):
                tops[i] = top[j]
    failed: list[str | None] = [None] * len(tokens)
    if bool(broken.any()):
        for i in broken.nonzero().squeeze(1).tolist():
            failed[i] = "the model's logits for this request are not finite (NaN) or every token is masked"
    return SamplerOutput(tokens.tolist(), logprobs, failed, tops)
