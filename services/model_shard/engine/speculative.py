"""Speculative decoding by prompt lookup (n-gram): proposals checked inside the continuous batch.

One stream's decode step reads every weight once to make one token; checking k + 1 positions in one
step costs about as much (the linears are memory-bound up to a few rows), so each proposal the
model agrees with is a token for free. Proposals come from the request's own context: the longest
recent n-gram that ends the context (its prompt and what it generated) and occurred before
proposes the tokens that followed it then, as vLLM's `ngram` method and llama.cpp's lookup do.
Answers that quote the prompt, retrieved documents or the history gain most.

Exact by construction, for every sampling parameter but grammars:
- the k + 1 positions run as one chunk over the paged cache, and every kernel gives a row the same
  numbers whatever the batch (model/dense.py), so position j's logits are those a plain decode step
  would compute after the first j proposals;
- position j is sampled as its own row, with the request's history extended by those proposals
  (penalties, min_tokens and the draw index of seeded sampling, see sampler.py, all follow);
- proposals are accepted while the sampled token equals them, and the first token that differs is
  kept as the correction: rejection sampling with a one-hot draft. Greedy and seeded requests give
  the same tokens with speculation on or off, and unseeded ones the same distribution.
Constrained (grammar) requests decode one token a step.

Never a loss, as far as a policy can see: a step speculates only while few sequences decode (beyond
that a step is compute-bound and checked positions cost real time), and a request whose proposals
keep failing waits exponentially longer between tries.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.model_shard.engine.request import Sequence

METHODS = ("off", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "off"  # "off" | "ngram"
    num_tokens: int = 4  # most tokens proposed per step
    min_ngram: int = 2  # shortest context suffix looked up
    max_ngram: int = 4  # longest (tried first)
    max_decoding: int = 4  # speculate only while at most this many sequences decode in a step

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.min_ngram}, {self.max_ngram}")
        if self.max_decoding < 1:
            raise ValueError(f"max_decoding must be at least 1, got {self.max_decoding}")


class NgramIndex:
    """Where each n-gram of one sequence's tokens last occurred, grown as the tokens grow: a proposal
    costs a dictionary lookup per n, not a scan of the context."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)
        self.follower: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending before this position are in the maps

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest n-gram ending tokens."""
        length = len(tokens)
        for end in range(max(self.indexed, 1), length):  # n-grams with a follower: they end before the last token
            for n, follower in self.follower.items():
                if end >= n:
                    follower[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, length)
        for n in self.sizes:
            if length >= n:
                start = self.follower[n].get(tuple(tokens[length - n :]))
                if start is not None:
                    return tokens[start : start + k]
        return []


@dataclass
class _RequestState:
    index: NgramIndex
    misses: int = 0  # proposals in a row with nothing accepted
    resume_step: int = 0  # no proposal before this step


@dataclass
class SpeculationStats:
    proposed: int = 0  # tokens proposed and checked
    accepted: int = 0  # of those, accepted
    steps: int = 0  # sequence-steps that checked proposals


class Speculator:
    """Proposes drafts for the scheduler and learns from what was accepted."""

    MAX_BACKOFF_STEPS = 32

    def __init__(self, config: SpeculativeConfig):
        config.validate()
        self.config = config
        self.stats = SpeculationStats()
        self._states: dict[str, _RequestState] = {}
        self._step = 0
        self._active = False

    def begin_step(self, running: list[Sequence]) -> None:
        """Decide whether this step speculates, and forget requests that are no longer running."""
        self._step += 1
        decoding = sum(s.num_tokens - s.num_computed_tokens == 1 for s in running)
        self._active = decoding <= self.config.max_decoding
        if len(self._states) > len(running):
            alive = {s.request_id for s in running}
            self._states = {rid: st for rid, st in self._states.items() if rid in alive}

    def draft(self, seq: Sequence, limit: int) -> list[int]:
        """Tokens to check after seq's next one, at most limit (what its budget, context and
        max_tokens leave); [] when this step or this request does not speculate."""
        if not self._active or limit < 1 or seq.params.structured is not None:
            return []
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = _RequestState(NgramIndex(self.config.min_ngram, self.config.max_ngram))
        if self._step < state.resume_step:
            return []
        return state.index.propose(seq.token_ids, min(limit, self.config.num_tokens))

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """How many of a draft's proposals the model accepted."""
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.steps += 1
        state = self._states.get(seq.request_id)
        if state is None:
            return
        if accepted:
            state.misses = 0
        else:
            state.misses += 1
            state.resume_step = self._step + min(1 << state.misses, self.MAX_BACKOFF_STEPS)


def accepted_prefix(draft: list[int], sampled: list[int]) -> int:
    """How many leading proposals the sampled tokens confirm (sampled[j] is position j's token)."""
    n = 0
    while n < len(draft) and sampled[n] == draft[n]:
        n += 1
    return n
