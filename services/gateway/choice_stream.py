"""One choice's stream from a model shard: the shard call on the replica routing chose (the next
one if it fails before its first message), text made from its tokens (answer_text.py), and a shard
lost mid-answer resumed on another replica from what was delivered, so the client sees one stream."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from prometheus_client import Histogram

from llmmesh.v1 import common_pb2, gateway_pb2, shard_pb2
from services.common.telemetry import trace_exemplar
from services.gateway.answer_text import AnswerText
from services.gateway.detokenize import DetokenizeSession, close_stream
from services.gateway.errors import RpcError
from services.gateway.routing import PrefixAffinity
from services.gateway.shard_calls import ShardLost, next_shard_message, open_shard_stream
from services.gateway.shards import Replica, ShardPool
from services.gateway.tools import HERMES, ToolFormat

log = logging.getLogger(__name__)

ITL = Histogram("llmmesh_inter_token_latency_seconds", "Gap between streamed tokens (a message's gap shared by its tokens)",
                buckets=(0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5))
MAX_RESUMES = 2  # times one request may move to another replica after its shard went away


@dataclass(frozen=True)
class ChoiceCall:
    """What one choice's shard call needs (see ChoiceStreams.stream)."""

    index: int
    request_id: str
    call_id: str
    prompt_ids: list[int]
    sampling: common_pb2.SamplingParams
    tokenizer_version: str
    deadline: float
    order: list[Replica] | None
    hashes: list[bytes]
    tenant: str
    priority: int
    weight: float
    tool_names: frozenset[str] | None  # the calls to take out of the text; None: no tools
    retain_blocks: bool = False  # a stored conversation's turn: the shard keeps its blocks longest
    cache_scope: bytes = b""  # whose cached prefix blocks it may reuse (block_hash.cache_scope)
    answer_scope: bytes = b""  # whose earlier answers the shard may propose to it (speculative decoding)
    tool_format: ToolFormat = HERMES  # the format the prompt asked the model to call tools in


def resume_request(request: shard_pb2.ShardGenerateRequest, delivered: list[int]) -> shard_pb2.ShardGenerateRequest:
    """The call that continues `request` on another replica after `delivered` tokens reached the
    client: prompt + those tokens, the draws a seeded generator already made skipped, the budgets
    reduced by what was spent, and the prompt's log-probabilities not asked again."""
    resume = shard_pb2.ShardGenerateRequest()
    resume.CopyFrom(request)
    resume.prompt_token_ids.extend(delivered)
    resume.resume_draws = request.resume_draws + len(delivered)
    resume.sampling.max_tokens = request.sampling.max_tokens - len(delivered)
    resume.sampling.min_tokens = max(0, request.sampling.min_tokens - len(delivered))
    resume.sampling.prompt_logprobs = False  # delivered with the first message
    return resume


class ChoiceStreams:
    def __init__(self, shards: ShardPool, affinity: PrefixAffinity | None, vocabulary, tokenizer,
                 tokenizer_timeout_s: float, first_message_timeout_s: float):
        """vocabulary: the gateway's TokenizerMirror (None: detokenize through the tokenizer service);
        tokenizer: the tokenizer service's stub, for that."""
        self.shards = shards
        self.affinity = affinity
        self.vocabulary = vocabulary
        self.tokenizer = tokenizer
        self.tokenizer_timeout_s = tokenizer_timeout_s
        self.first_message_timeout_s = first_message_timeout_s

    async def stream(self, c: ChoiceCall, stop: list[str]):
        """One choice's messages, from its shard stream: text made here, stop strings matched, a lost
        shard resumed on another replica from what was delivered. Its first message carries, in usage,
        the prompt tokens the shard had cached; its last, its finish reason."""
        shard_request = shard_pb2.ShardGenerateRequest(request_id=c.call_id, prompt_token_ids=c.prompt_ids,
                                                       sampling=c.sampling, tenant=c.tenant, priority=c.priority,
                                                       tenant_weight=c.weight, retain_blocks=c.retain_blocks,
                                                       cache_scope=c.cache_scope, answer_scope=c.answer_scope)
        token_ids: list[int] = []
        finish_reason = last_shard_reason = ""
        last_at, resumes = None, 0
        detok = self.vocabulary.session(c.tokenizer_version) if self.vocabulary is not None else None
        if detok is None:  # the vocabulary of this request's Encode is not held here (yet)
            detok = DetokenizeSession(self.tokenizer, timeout=max(c.deadline - time.monotonic(), 0.001),
                                      reply_timeout_s=self.tokenizer_timeout_s)
        answer = AnswerText(detok, stop, c.tool_names, c.tool_format)
        replica, call, span = None, None, trace.get_current_span()
        first_wait = self.first_message_timeout_s
        try:
            replica, call, msg = await open_shard_stream(self.shards, shard_request, c.deadline, first_wait, c.order, c.tenant)
            if self.affinity is not None:
                self.affinity.record(replica.address, c.hashes)
                span.set_attribute("llmmesh.replica", replica.address)
            first = True
            while True:  # ends at a finish reason; a lost shard resumes elsewhere or raises
                token_ids.extend(msg.token_ids)
                last_shard_reason = msg.finish_reason
                piece = await answer.feed(msg.token_ids, msg.finish_reason)
                finish_reason = piece.finish_reason
                chunk = gateway_pb2.GenerateStreamResponse(
                    text=piece.text, token_ids=msg.token_ids, request_id=c.request_id, index=c.index,
                    logprobs=msg.logprobs, top_logprobs=msg.top_logprobs, prompt_logprobs=msg.prompt_logprobs,
                    prompt_top_logprobs=msg.prompt_top_logprobs, finish_reason=finish_reason,
                    tool_calls=piece.tool_calls, stop_sequence=piece.stop_sequence)
                if first:
                    first = False
                    chunk.usage.cached = msg.cached_tokens
                    if c.sampling.prompt_logprobs:
                        chunk.prompt_token_ids.extend(c.prompt_ids)
                now = time.monotonic()
                if msg.token_ids and last_at is not None:
                    gap, exemplar = (now - last_at) / len(msg.token_ids), trace_exemplar()
                    for _ in msg.token_ids:
                        ITL.observe(gap, exemplar)
                if msg.token_ids:
                    last_at = now
                yield chunk
                if finish_reason:
                    break
                try:
                    msg = await next_shard_message(call)
                except ShardLost as lost:
                    # Resume on another replica from what was delivered: prompt + tokens so far, the
                    # draws a seeded generator already made skipped. The client sees one stream.
                    if resumes >= MAX_RESUMES:
                        raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{lost}; no replica could take over") from None
                    resumes += 1
                    log.warning("shard %s lost request %s (choice %d) after %d tokens (%s); resuming elsewhere",
                                replica.address, c.request_id, c.index, len(token_ids), lost)
                    span.add_event("resumed", {"llmmesh.from_replica": replica.address, "llmmesh.choice": c.index,
                                               "llmmesh.delivered_tokens": len(token_ids)})
                    self.shards.mark_down(replica)
                    await close_stream(call, cancel=True)
                    replica.end(c.tenant)
                    replica, call = None, None
                    replica, call, msg = await open_shard_stream(
                        self.shards, resume_request(shard_request, token_ids), c.deadline, first_wait, tenant=c.tenant)
        finally:
            if call is not None:
                # A stop string, a client cancel or an error cancels: the shard frees the work now.
                await close_stream(call, cancel=not last_shard_reason)
            await detok.close()
            if replica is not None:
                replica.end(c.tenant)
