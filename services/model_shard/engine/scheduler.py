"""Iteration-level scheduling: requests join and leave the running batch between steps.

No torch and no gRPC here. The engine loop calls `schedule()`, runs the step, then
`update_from_output()`; aborts are applied between steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from services.model_shard.engine.kv_blocks import BlockPool
from services.model_shard.engine.request import FinishReason, RequestOutput, Sequence


class QueueFullError(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_running: int = 64
    max_waiting: int = 256
    max_batched_tokens: int = 4096


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes: the prompt, or 1 when decoding


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # executors drop their state for these

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[str] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _reserved_tokens(self, seq: Sequence) -> int:
        # Blocks for the whole answer are reserved at admission, so a running sequence never
        # waits for memory mid-stream.
        return min(len(seq.prompt_token_ids) + seq.params.max_tokens, self.config.max_model_len)

    def add(self, seq: Sequence) -> None:
        prompt_len = len(seq.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("the prompt has no tokens")
        if prompt_len >= self.config.max_model_len:
            raise ValueError(f"the prompt is {prompt_len} tokens; the context holds {self.config.max_model_len}")
        needed = self.pool.blocks_for(self._reserved_tokens(seq))
        if needed > self.pool.num_blocks:
            raise ValueError(f"the request needs {needed} KV blocks; this shard holds {self.pool.num_blocks}")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting already")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORTED)
                    return seq
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        seq.times.finished_ns = time.time_ns()
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        self._finished_ids.append(seq.request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_batched_tokens
        for seq in self.running:
            out.scheduled.append(ScheduledSeq(seq, 1))
            budget -= 1
        admitted_prefill = False
        while self.waiting and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            num_new = seq.num_tokens - seq.num_computed_tokens
            # One prompt longer than the budget may still run alone rather than never.
            if num_new > budget and admitted_prefill:
                break
            blocks = self.pool.allocate(self.pool.blocks_for(self._reserved_tokens(seq)))
            if blocks is None:
                break
            self.waiting.popleft()
            seq.block_ids = blocks
            seq.times.scheduled_ns = time.time_ns()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            admitted_prefill = True
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: list[int]) -> list[RequestOutput]:
        """sampled[i] is the token made for out.scheduled[i]."""
        results = []
        now = time.time_ns()
        for item, token in zip(out.scheduled, sampled, strict=True):
            seq = item.seq
            if seq.finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            seq.output_token_ids.append(token)
            if seq.times.first_token_ns is None:
                seq.times.first_token_ns = now
            reason = None
            if token in seq.eos_token_ids:
                reason = FinishReason.STOP
            elif len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.config.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            results.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token],
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt_token_ids),
                    cached_tokens=seq.num_cached_tokens,
                    times=seq.times,
                )
            )
        return results
