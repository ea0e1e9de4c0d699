"""Iteration-level scheduling: requests join and leave the running batch between steps.

Each step has a token budget. Running sequences come first (a decode costs one token; a prompt
still being prefilled takes a chunk of what is left), then waiting requests are admitted while
budget, batch slots and KV blocks last. Blocks are allocated as sequences grow; when none is
free, the most recently admitted sequence is preempted (its blocks freed, recomputed later).
Prompts start from the longest prefix of full blocks already cached in the pool; a prompt whose
next full blocks another running sequence is computing now waits for them (it does not compute them
a second time), so concurrent requests with one prompt, such as the choices of an n > 1 request,
share its blocks by reference count.

No torch and no gRPC here. The engine loop calls `schedule()`, runs the step, then
`update_from_output()`; aborts are applied between steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from services.common.block_hash import chain_block_hashes
from services.model_shard.engine.fairness import FairnessConfig, FairShares
from services.model_shard.engine.grammar import grammar_failure
from services.model_shard.engine.kv_blocks import BlockPool
from services.model_shard.engine.request import FinishReason, RequestOutput, Sequence, TopLogprobs
from services.model_shard.engine.speculative import Speculator, accepted_prefix


class QueueFullError(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_running: int = 64
    max_waiting: int = 256
    max_batched_tokens: int = 512  # per step; longer prompts are prefilled in chunks of what is left
    # Prompt tokens a step may carry beside running decodes (None: what max_batched_tokens leaves).
    # Each such step delays every stream's next token by the chunk's cost; on a compute-bound
    # device a small chunk keeps inter-token latency near a decode step's, at the cost of TTFT.
    # Steps without decodes (an idle shard, a burst of arrivals) still prefill max_batched_tokens.
    prefill_tokens_beside_decodes: int | None = None
    enable_prefix_caching: bool = True
    fairness: FairnessConfig = FairnessConfig()  # priority classes and tenants' shares (fairness.py)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes
    sample: bool  # this step reaches the end of the sequence's tokens: sample the next one
    token_mask: object | None = None  # a constrained sequence's allowed next tokens (grammar.py), set by the engine
    # Proposed tokens checked after the sequence's last one (speculative.py): num_new_tokens is
    # 1 + len(draft), and each of those positions samples.
    draft: list[int] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """Prompt log-probabilities a step computed for one sequence: entries start.. of
    Sequence.prompt_logprobs (and prompt_top_logprobs, where it asked for alternatives)."""

    start: int
    logprobs: list[float]
    top: list[TopLogprobs] | None = None


@dataclass
class ModelRunnerOutput:
    """What an executor returns for a step: lists aligned with SchedulerOutput.scheduled (None
    where a sequence did not sample). Lists, not tensors: it may cross processes."""

    # A drafted sequence's entries are lists, one per checked position.
    tokens: list[int | list[int] | None]
    logprobs: list[float | list[float | None] | None]
    errors: list[str | None] | None = None  # why a row could not be sampled (None: all were)
    top_logprobs: list[TopLogprobs | None] | None = None  # None: no row asked
    prompt_logprobs: list[PromptLogprobs | None] | None = None  # None: no row asked

    def extend(self, other: "ModelRunnerOutput") -> None:
        """Append another micro-batch's output (the lists stay aligned with the scheduled items)."""
        n, m = len(self.tokens), len(other.tokens)
        for name in ("errors", "top_logprobs", "prompt_logprobs"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None or theirs is not None:
                setattr(self, name, (mine or [None] * n) + (theirs or [None] * m))
        self.tokens += other.tokens
        self.logprobs += other.logprobs


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Constraints:
    """What the scheduler asks of constrained decoding (grammar.py implements it): nothing by default."""

    def advance(self, seq: Sequence, token: int) -> bool:
        """Accept seq's new token; True when its grammar is complete. ValueError if it does not fit."""
        return False

    def release(self, seq: Sequence) -> None:
        """seq is finished: forget its matcher."""

    def valid_prefix(self, seq: Sequence, draft: list[int]) -> int:
        """How many leading tokens of a proposal for seq its grammar allows."""
        return len(draft)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, constraints: Constraints | None = None,
                 speculator: Speculator | None = None):
        if config.max_batched_tokens < 1:
            raise ValueError("max_batched_tokens must be at least 1")
        if config.prefill_tokens_beside_decodes is not None and config.prefill_tokens_beside_decodes < 1:
            raise ValueError("prefill_tokens_beside_decodes must be at least 1")
        self.config = config
        self.pool = pool
        self.constraints = constraints or Constraints()
        self.speculator = speculator  # proposes tokens for decoding sequences to check (None: off)
        self.shares = FairShares(config.fairness)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # (block id, hash, retain) computed since the last take; retain: a stored conversation's block
        self._new_prompt_blocks: list[tuple[int, bytes, bool]] = []
        self._computing: dict[bytes, Sequence] = {}  # hash of a full block being computed -> the sequence computing it
        # Admission keeps a few blocks free so running sequences can grow without preempting at once.
        self._watermark = max(1, pool.num_blocks // 100)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        prompt_len = len(seq.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("the prompt has no tokens")
        if prompt_len >= self.config.max_model_len:
            raise ValueError(f"the prompt is {prompt_len} tokens; the context holds {self.config.max_model_len}")
        needed = self.pool.blocks_for(prompt_len + 1)
        if needed > self.pool.num_blocks:
            raise ValueError(f"the prompt needs {needed} KV blocks; this shard holds {self.pool.num_blocks}")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting already")
        self.waiting.append(seq)
        self.shares.join(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORTED)
                    return seq
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.shares.leave(seq)
        self.constraints.release(seq)
        seq.finish_reason = reason
        seq.times.finished_ns = time.time_ns()
        self._release(seq)
        if self.speculator is not None:
            self.speculator.finished(seq)

    def _release(self, seq: Sequence) -> None:
        for h in seq.block_hashes[seq.num_registered_blocks:]:
            if self._computing.get(h) is seq:
                del self._computing[h]
        self.pool.free(seq.block_ids, retain=seq.retain_blocks)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def _grow(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        """Give seq blocks for num_tokens tokens, leaving keep_free blocks free; False if it can't."""
        need = self.pool.blocks_for(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if self.pool.num_free - need < keep_free:
            return False
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        seq.block_ids.extend(blocks)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first; it recomputes (its full blocks may still be cached)."""
        self._release(seq)
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.shares.requeued(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.shares.step += 1
        self._make_room(out)
        budget = self.config.max_batched_tokens
        # Decodes first (a stable sort keeps admission order within each kind): a prompt still being
        # chunked never takes the budget a stream's next token needs.
        self.running.sort(key=self.shares.running_order_key)
        decoding = sum(s.num_tokens - s.num_computed_tokens == 1 for s in self.running)
        if self.speculator is not None:
            self.speculator.begin_step(decoding)
        cap = self.config.prefill_tokens_beside_decodes
        prompt_budget = cap if cap is not None and decoding else budget  # prompt tokens, of `budget`
        kv_short = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            num_new = min(remaining, budget) if remaining == 1 else min(remaining, budget, prompt_budget)
            if num_new == 0:
                break
            if remaining == 1 and self._schedule_draft(out, seq, budget):
                budget -= out.scheduled[-1].num_new_tokens
                i += 1
                continue
            while not self._grow(seq, seq.num_computed_tokens + num_new):
                victim = self.shares.victim(self.running[i:], self.running)  # fcfs: the latest admitted
                self.running.remove(victim)
                self._preempt(victim)
                out.num_preempted += 1
                kv_short = True
                if victim is seq:
                    break
            else:
                self._schedule(out, seq, num_new)
                budget -= num_new
                if remaining > 1:
                    prompt_budget -= num_new
                i += 1
        budget = min(budget, prompt_budget)
        # No admissions in a step that had to preempt for blocks: memory is short.
        skip: set[int] = set()  # waiting for blocks another sequence is computing; they keep their place
        while not kv_short and self.waiting and len(self.running) < self.config.max_running and budget > 0:
            seq = self.shares.next_to_admit(self.waiting, self.running, skip)
            if seq is None:
                break
            if self._awaits_blocks(seq):
                skip.add(id(seq))
                continue
            self._take_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + num_new, self._watermark if self.running else 0):
                self._release(seq)
                break
            self.waiting.remove(seq)
            if seq.times.scheduled_ns is None:
                seq.times.scheduled_ns = time.time_ns()
            self.running.append(seq)
            self._claim_blocks(seq)
            self._schedule(out, seq, num_new)
            budget -= num_new
        return out

    def _schedule(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
        self.shares.charge(seq, num_new)

    def _schedule_draft(self, out: SchedulerOutput, seq: Sequence, budget: int) -> bool:
        """Schedule a decoding seq's next token with proposals to check after it, where the speculator
        has some and its blocks fit without preempting anyone; False: schedule it plainly."""
        if self.speculator is None:
            return False
        limit = min(budget - 1, self.config.max_model_len - seq.num_tokens,
                    seq.params.max_tokens - len(seq.output_token_ids) - 1)
        draft = self.speculator.draft(seq, limit)
        if draft and seq.params.structured is not None:
            draft = draft[: self.constraints.valid_prefix(seq, draft)]
        if not draft or not self._grow(seq, seq.num_computed_tokens + 1 + len(draft), self._watermark):
            return False
        out.scheduled.append(ScheduledSeq(seq, 1 + len(draft), True, draft=draft))
        self.shares.charge(seq, 1 + len(draft))
        return True

    def _make_room(self, out: SchedulerOutput) -> None:
        """Preempt running sequences for the request next in line where it deserves their place (a
        higher class, or a tenant under its share) and the batch is full or KV is short (fairness.py)."""
        for _ in range(self.config.fairness.max_preemptions):
            if not self.running or not self.waiting:
                return
            seq = self.shares.next_to_admit(self.waiting, self.running)
            first_chunk = self.pool.blocks_for(min(seq.num_tokens, self.config.max_batched_tokens))
            if len(self.running) < self.config.max_running and first_chunk <= self.pool.num_free - self._watermark:
                return
            victim = self.shares.victim(self.running, self.running)
            if not self.shares.may_preempt_for(seq, victim, self.running, self.config.max_running):
                return
            self.running.remove(victim)
            self._preempt(victim)
            out.num_preempted += 1

    def _awaits_blocks(self, seq: Sequence) -> bool:
        """Whether a full block seq would compute is being computed by another running sequence."""
        if not self._computing or seq.params.prompt_logprobs:
            return False
        hashes = chain_block_hashes(seq.token_ids, self.pool.block_size, seq.block_hashes, seq.cache_root)
        return any(self._computing.get(h, seq) is not seq for h in hashes[: (seq.num_tokens - 1) // self.pool.block_size])

    def _claim_blocks(self, seq: Sequence) -> None:
        """Note the full blocks seq is about to compute, so that others with the same prefix wait for them."""
        for h in seq.block_hashes[seq.num_computed_tokens // self.pool.block_size:]:
            self._computing.setdefault(h, seq)

    def _take_cached_prefix(self, seq: Sequence) -> None:
        if not self.config.enable_prefix_caching or seq.block_ids:
            return
        bs = self.pool.block_size
        chain_block_hashes(seq.token_ids, bs, seq.block_hashes, seq.cache_root)
        if seq.params.prompt_logprobs:  # it computes every prompt token: their log-probabilities need them
            return
        # At least the last token is computed: its logits pick the next one.
        usable = seq.block_hashes[: (seq.num_tokens - 1) // bs]
        seq.block_ids = self.pool.take_cached_prefix(usable)
        seq.num_registered_blocks = len(seq.block_ids)  # they are named in the pool already
        seq.num_computed_tokens = len(seq.block_ids) * bs
        if not seq.output_token_ids:
            seq.num_cached_tokens = seq.num_computed_tokens

    def _register_computed_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed_tokens // self.pool.block_size
        if not self.config.enable_prefix_caching or full <= seq.num_registered_blocks:
            return
        chain_block_hashes(seq.token_ids[: full * self.pool.block_size], self.pool.block_size, seq.block_hashes,
                           seq.cache_root)
        prompt_blocks = len(seq.prompt_token_ids) // self.pool.block_size
        for j in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_ids[j], seq.block_hashes[j])
            if self._computing.get(seq.block_hashes[j]) is seq:
                del self._computing[seq.block_hashes[j]]
            if j < prompt_blocks:
                self._new_prompt_blocks.append((seq.block_ids[j], seq.block_hashes[j], seq.retain_blocks))
        seq.num_registered_blocks = full

    def take_new_prompt_blocks(self) -> list[tuple[int, bytes, bool]]:
        """Full prompt blocks computed (not reused) since the last call, as (block id, hash, retain):
        what a shared cache does not have from this shard yet. Valid until the next step allocates."""
        blocks, self._new_prompt_blocks = self._new_prompt_blocks, []
        return blocks

    def fail(self, out: SchedulerOutput, error: str) -> list[RequestOutput]:
        """End every sequence a failed step scheduled (their KV for it is not there) with the error."""
        return [self._fail(item.seq, error) for item in out.scheduled if not item.seq.finished]

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        if seq in self.running:
            self.running.remove(seq)
        seq.error = error
        self._finish(seq, FinishReason.ERROR)
        return RequestOutput(seq.request_id, [], FinishReason.ERROR, len(seq.prompt_token_ids), seq.num_cached_tokens,
                             seq.times, error=error)

    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        """result.tokens[i] is the token made for out.scheduled[i] (None where it did not sample)."""
        results = []
        nothing = [None] * len(out.scheduled)
        for item, token, logprob, error, top, prompt in zip(
                out.scheduled, result.tokens, result.logprobs, result.errors or nothing,
                result.top_logprobs or nothing, result.prompt_logprobs or nothing, strict=True):
            seq = item.seq
            if seq.finished:  # aborted while the step ran
                continue
            if error is not None:
                results.append(self._fail(seq, error))
                continue
            tokens, logprobs, tops = self._verified(item, token, logprob, top)
            if prompt is not None:
                _record_prompt_logprobs(seq, prompt)
            if not item.sample:
                self._register_computed_blocks(seq)
                continue
            first = not seq.output_token_ids
            made, reason, failure = self._append(seq, tokens)
            if item.draft:  # the KV of every token but the last made is in the cache now
                seq.num_computed_tokens = seq.num_tokens - 1
            self._register_computed_blocks(seq)
            if failure is not None:
                results.append(self._fail(seq, failure))
                continue
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            elif item.draft:
                self._trim_blocks(seq)
            results.append(self._output(seq, made, logprobs[: len(made)], tops[: len(made)], reason, first))
        return results


    def _verified(self, item: ScheduledSeq, token, logprob, top) -> tuple[list, list, list]:
        """The tokens item's step made, with their log-probabilities and alternatives: a drafted
        sequence keeps the positions up to the first that differs from its proposal (that
        position's token is the correction). A plain item's computed tokens are counted here."""
        seq = item.seq
        if not item.draft:
            seq.num_computed_tokens += item.num_new_tokens
            return [token], [logprob], [top]
        n = len(token)
        accepted = accepted_prefix(item.draft, token)
        self.speculator.record(seq, len(item.draft), accepted)
        keep = accepted + 1
        return token[:keep], (logprob or [None] * n)[:keep], (top or [None] * n)[:keep]

    def _trim_blocks(self, seq: Sequence) -> None:
        """Free the blocks that only rejected proposals reached (none of them is registered)."""
        keep = self.pool.blocks_for(seq.num_computed_tokens + 1)
        if len(seq.block_ids) > keep:
            self.pool.free(seq.block_ids[keep:])
            del seq.block_ids[keep:]

    def _append(self, seq: Sequence, tokens: list[int]) -> tuple[list[int], FinishReason | None, str | None]:
        """Append a step's tokens to seq up to the first that ends it: (those appended, why it ends,
        why it fails)."""
        made: list[int] = []
        for token in tokens:
            seq.append_token(token)
            made.append(token)
            if seq.times.first_token_ns is None:
                seq.times.first_token_ns = time.time_ns()
            try:
                complete = seq.params.structured is not None and self.constraints.advance(seq, token)
            except ValueError as exc:  # the grammar reached a limit, or refused a token it had allowed
                return made, None, grammar_failure(exc)
            if seq.ends_with(token) or complete:
                return made, FinishReason.STOP, None
            if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.config.max_model_len:
                return made, FinishReason.LENGTH, None
        return made, None, None

    @staticmethod
    def _output(seq: Sequence, made: list[int], logprobs: list, tops: list, reason: FinishReason | None,
                first: bool) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=made,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_token_ids),
            cached_tokens=seq.num_cached_tokens,
            times=seq.times,
            new_logprobs=None if logprobs[0] is None else logprobs,
            new_top_logprobs=None if tops[0] is None else tops,
            prompt_logprobs=list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs else None,
            prompt_top_logprobs=list(seq.prompt_top_logprobs)
            if first and seq.params.prompt_logprobs and seq.params.top_logprobs else None,
        )


def _record_prompt_logprobs(seq: Sequence, prompt: PromptLogprobs) -> None:
    """Keep what a step computed; a recomputed prefix (after preemption) overwrites its own entries."""
    del seq.prompt_logprobs[prompt.start:]
    seq.prompt_logprobs.extend(prompt.logprobs)
    if prompt.top is not None:
        del seq.prompt_top_logprobs[prompt.start:]
        seq.prompt_top_logprobs.extend(prompt.top)
