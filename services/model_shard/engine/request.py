"""What the engine knows of a request: its sampling parameters, its tokens, its state."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from services.common.block_hash import ROOT

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs

# The k most likely tokens at one position, most likely first: (token ids, log-probabilities).
TopLogprobs = tuple[list[int], list[float]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; drop tokens below min_p x the most likely token's probability
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens: once per token that occurred
    frequency_penalty: float = 0.0  # and once per occurrence
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # end tokens (EOS and stop_token_ids) are held back until this many are made
    ignore_eos: bool = False  # the model's end token does not end the answer
    stop_token_ids: tuple[int, ...] = ()  # end the answer like the end token
    logprobs: bool = False  # report each sampled token's log-probability
    top_logprobs: int = 0  # and the k most likely tokens at each position (also for prompt_logprobs)
    raw_logprobs: bool = False  # of the model's own distribution; default: after penalties and bias (sampler.py)
    prompt_logprobs: bool = False  # report each prompt token's log-probability (computed, never reused)
    skip_draws: int = 0  # a resumed request: the draws its random stream already made elsewhere
    structured: object | None = None  # an OutputSpec (grammar.py): the answer is constrained to it

    def validate(self) -> None:
        """Refuse what the sampler gives no meaning to (NaN fails every comparison below)."""
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        bad = next((b for _, b in self.logit_bias if not -100.0 <= b <= 100.0), None)
        if bad is not None:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bad}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise ValueError("top_logprobs needs logprobs (or prompt_logprobs)")
        if self.skip_draws < 0:
            raise ValueError(f"skip_draws must be >= 0, got {self.skip_draws}")

    def delivered_tokens(self, prompt_token_ids: list[int]) -> list[int]:
        """A resumed request's tokens delivered elsewhere before the resume: the end of its prompt."""
        return list(prompt_token_ids[len(prompt_token_ids) - self.skip_draws:]) if self.skip_draws else []


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token
    LENGTH = "length"  # max_tokens or the context limit
    ABORTED = "aborted"  # cancelled, deadline passed, or aborted by the caller
    ERROR = "error"  # the engine could not compute it (RequestOutput.error says why)


@dataclass
class RequestTimes:
    """Wall-clock nanoseconds (for trace spans) of a request's life in the engine."""

    arrival_ns: int = field(default_factory=time.time_ns)
    scheduled_ns: int | None = None
    first_token_ns: int | None = None
    finished_ns: int | None = None


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    draw_seed: int = 0  # int64 seed of the request's random stream (see sampler.py)
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, grown in place
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks, as known
    num_registered_blocks: int = 0  # leading blocks named in the pool's prefix cache
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens whose prefill the prefix cache saved
    num_preemptions: int = 0
    # With params.prompt_logprobs: entry p is token p+1's log-probability given tokens 0..p.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None  # with FinishReason.ERROR
    times: RequestTimes = field(default_factory=RequestTimes)
    trace_carrier: dict[str, str] | None = None  # W3C trace context of the request (workers' spans join it)
    tenant: str = ""  # whose request it is: tenants share the shard by weight (fairness.py)
    priority: int = 0  # its class: 0 goes first
    weight: float = 1.0  # its tenant's weight
    retain_blocks: bool = False  # its blocks, once freed, are evicted last (a stored conversation's)
    cache_root: bytes = ROOT  # where its block hash chain starts: its prefix-cache scope's (block_hash.py)
    answer_scope: bytes = b""  # whose earlier answers may be proposed to it (speculative.py's suffix)
    enqueued_step: int = 0  # the scheduler step it last joined the waiting queue at

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    def append_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.token_ids.append(token)

    @property
    def generated_token_ids(self) -> list[int]:
        """The answer's tokens so far, those a resumed request was delivered elsewhere included (they end
        its prompt): what OpenAI's presence and frequency penalties count."""
        return self.token_ids[len(self.prompt_token_ids) - self.params.skip_draws:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def ends_with(self, token: int) -> bool:
        """Whether `token`, just appended, ends the answer (an end token past the first min_tokens)."""
        if len(self.output_token_ids) <= self.params.min_tokens:
            return False
        return (token in self.eos_token_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids

    def held_back_tokens(self) -> tuple[int, ...]:
        """End tokens the sampler must not pick for the next token (min_tokens not reached yet)."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return ()
        return (*(() if self.params.ignore_eos else self.eos_token_ids), *self.params.stop_token_ids)


class RequestFault(str):
    """A RequestOutput.error that the request's content caused (e.g. its grammar reached a limit of
    the grammar engine): the caller's to fix, answered INVALID_ARGUMENT, not a fault of the server."""


@dataclass
class RequestOutput:
    """What a step produced for one request: lists only, it may cross processes."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_tokens: int
    times: RequestTimes
    new_logprobs: list[float] | None = None
    error: str | None = None  # with FinishReason.ERROR: what went wrong (a RequestFault: the request's fault)
    new_top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float] | None = None  # on a request's first output, when it asked
    prompt_top_logprobs: list[TopLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
