"""Speculative decoding inside the continuous batch: proposals checked by the model, exactly.

One stream's decode step reads every weight once to make one token; checking k + 1 positions in one
step costs about as much (the linears are memory-bound up to a few rows), so each proposal the
model agrees with is a token for free. Proposals come from proposers.py, with no second model: the
request's own context (prompt lookup, `ngram`) and, for `suffix`, the answers given before in the
request's scope as well.

Exact by construction, for every sampling parameter:
- the k + 1 positions run as one chunk over the paged cache, and every kernel gives a row the same
  numbers whatever the batch (model/dense.py), so position j's logits are those a plain decode step
  would compute after the first j proposals;
- position j is sampled as its own row, with the request's history extended by those proposals
  (penalties, min_tokens, a grammar's mask and the draw index of seeded sampling, see sampler.py,
  all follow);
- proposals are accepted while the sampled token equals them, and the first token that differs is
  kept as the correction: rejection sampling with a one-hot draft. Greedy and seeded requests give
  the same tokens with speculation on or off, and unseeded ones the same distribution.

Never a loss, as far as a policy can see: a step speculates only while few sequences decode (beyond
that a step is compute-bound and checked positions cost real time); each request's k follows what
it had accepted so far, and a request whose proposals keep failing waits exponentially longer
between tries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from services.model_shard.engine.proposers import AnswerStore, NgramIndex
from services.model_shard.engine.request import FinishReason, Sequence

METHODS = ("off", "auto", "ngram", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "off"  # one of METHODS; auto: suffix (the one measured never to lose, bench/speculative.py)
    num_tokens: int = 4  # most tokens proposed per step
    min_ngram: int = 2  # shortest context suffix looked up in the request's own context
    max_ngram: int = 4  # longest (tried first)
    max_decoding: int = 4  # speculate only while at most this many sequences decode in a step
    answer_store_tokens: int = 200_000  # suffix: tokens of earlier answers kept, in all scopes

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.min_ngram}, {self.max_ngram}")
        if self.max_decoding < 1:
            raise ValueError(f"max_decoding must be at least 1, got {self.max_decoding}")
        if self.answer_store_tokens < 0:
            raise ValueError(f"the answer store's size must be >= 0 tokens, got {self.answer_store_tokens}")

    @property
    def resolved(self) -> str:
        """The method that runs: auto is suffix."""
        return "suffix" if self.method == "auto" else self.method


class Proposer(Protocol):
    """Guesses of a sequence's next tokens, named for the metrics."""

    def propose(self, seq: Sequence, k: int) -> tuple[str, list[int]]:
        """(which proposer, up to k tokens to follow seq's tokens)."""

    def finished(self, seq: Sequence) -> None:
        """seq ended: learn from it, forget its own state."""


class PromptLookup:
    """Proposals from the request's own context (NgramIndex), one index per running request."""

    name = "ngram"

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, NgramIndex] = {}

    def match(self, seq: Sequence, k: int) -> tuple[int, list[int]]:
        index = self._indexes.get(seq.request_id)
        if index is None:
            index = self._indexes[seq.request_id] = NgramIndex(self.min_n, self.max_n)
        return index.match(seq.token_ids, k)

    def propose(self, seq: Sequence, k: int) -> tuple[str, list[int]]:
        return self.name, self.match(seq, k)[1]

    def finished(self, seq: Sequence) -> None:
        self._indexes.pop(seq.request_id, None)


class SuffixDecoding(PromptLookup):
    """The request's own context and the earlier answers of its scope (seq.answer_scope): whichever
    matches the longer suffix of its context proposes."""

    name = "suffix"

    def __init__(self, min_n: int, max_n: int, store: AnswerStore):
        super().__init__(min_n, max_n)
        self.store = store

    def propose(self, seq: Sequence, k: int) -> tuple[str, list[int]]:
        own_n, own = self.match(seq, k)
        n, earlier = self.store.match(seq.answer_scope, seq.token_ids, k)
        if earlier and n > own_n:
            return self.name, earlier
        return PromptLookup.name, own

    def finished(self, seq: Sequence) -> None:
        super().finished(seq)
        if seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.store.add(seq.answer_scope, seq.prompt_token_ids, seq.output_token_ids)


def make_proposer(config: SpeculativeConfig) -> Proposer:
    if config.resolved == "ngram":
        return PromptLookup(config.min_ngram, config.max_ngram)
    if config.resolved == "suffix":
        return SuffixDecoding(config.min_ngram, config.max_ngram, AnswerStore(config.answer_store_tokens))
    raise ValueError(f"speculative method {config.method!r} proposes nothing")


@dataclass
class SpeculationStats:
    proposed: int = 0  # tokens proposed and checked
    accepted: int = 0  # of those, accepted
    checks: int = 0  # sequence-steps that checked proposals (each made accepted + 1 tokens)


@dataclass
class _RequestState:
    k: int  # tokens to propose next
    misses: int = 0  # checks in a row with nothing accepted
    resume_step: int = 0  # no proposal before this step
    source: str = ""  # which proposer made the draft being checked


@dataclass
class Speculator:
    """Proposes drafts for the scheduler and learns from what was accepted."""

    MAX_BACKOFF_STEPS = 32

    config: SpeculativeConfig
    proposer: Proposer | None = None  # default: the config's method's
    stats: dict[str, SpeculationStats] = field(default_factory=dict)  # by proposer

    def __post_init__(self):
        self.config.validate()
        if self.proposer is None:
            self.proposer = make_proposer(self.config)
        self._states: dict[str, _RequestState] = {}
        self._step = 0
        self._active = False

    def totals(self) -> SpeculationStats:
        return SpeculationStats(*(sum(getattr(s, f) for s in self.stats.values())
                                  for f in ("proposed", "accepted", "checks")))

    def begin_step(self, decoding: int) -> None:
        """Decide whether this step speculates, from how many running sequences decode in it."""
        self._step += 1
        self._active = decoding <= self.config.max_decoding

    def draft(self, seq: Sequence, limit: int) -> list[int]:
        """Tokens to check after seq's next one, at most limit (what its budget, context and
        max_tokens leave); [] when this step or this request does not speculate."""
        if not self._active or limit < 1:
            return []
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = _RequestState(self.config.num_tokens)
        if self._step < state.resume_step:
            return []
        state.source, tokens = self.proposer.propose(seq, min(limit, state.k))
        return tokens

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """How many of a draft's proposals the model accepted: the next k follows it."""
        state = self._states.get(seq.request_id)
        stats = self.stats.setdefault(state.source if state else "", SpeculationStats())
        stats.proposed += proposed
        stats.accepted += accepted
        stats.checks += 1
        if state is None:
            return
        if accepted == proposed:
            state.misses, state.k = 0, min(self.config.num_tokens, state.k + 2)
        elif accepted:
            state.misses, state.k = 0, max(1, accepted + 1)
        else:
            state.misses += 1
            state.k = max(1, state.k // 2)
            state.resume_step = self._step + min(1 << state.misses, self.MAX_BACKOFF_STEPS)

    def finished(self, seq: Sequence) -> None:
        """seq left the batch for good."""
        self._states.pop(seq.request_id, None)
        self.proposer.finished(seq)


def accepted_prefix(draft: list[int], sampled: list[int]) -> int:
    """How many leading proposals the sampled tokens confirm (sampled[j] is position j's token)."""
    n = 0
    while n < len(draft) and sampled[n] == draft[n]:
        n += 1
    return n
