"""The public Gateway service: tokenize, look up the response cache, stream from a shard, detokenize.

Per request: one Encode RPC and one request on its shard's GenerateBatch stream (shared by every request
routed to that replica, one message per engine step); tokens become text here, from the tokenizer's
vocabulary held by the gateway (or, until it is, one DetokenizeStream) — never an RPC per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from llmmesh.v1 import cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, shard_pb2, tokenizer_pb2
from llmmesh.v1 import tokenizer_pb2_grpc
from services.common.block_hash import cache_scope
from services.common.hash_ring import HashRing
from services.common.telemetry import trace_exemplar
from services.gateway import message_counts
from services.gateway.admission import Admission
from services.gateway.auth import ApiKeys, AuthError, bearer_token
from services.gateway.choice_stream import ChoiceCall, ChoiceStreams
from services.gateway.choices import Answer, StartedStream, UsageTally, choice_sampling, merge_choices, replay
from services.gateway.conversation_rpcs import ConversationRpcs, is_stored_turn
from services.gateway.conversations import Conversations
from services.gateway.detokenize import TokenizerMirror
from services.gateway.errors import RpcError
from services.gateway.prompt_encoding import Continuation, encode_prompt
from services.gateway.rate_limit import TenantRateLimiter
from services.gateway.redact import redact_value
from services.gateway.response_cache import lookup_response, response_key, store_response
from services.gateway.routing import PrefixAffinity
from services.gateway.shard_calls import downstream_error
from services.gateway.shards import NoShardAvailable, ShardPool
from services.gateway.tenants import PRIORITY_CLASSES
from services.gateway.tools import tool_grammar, tool_mode
from services.gateway.validation import InvalidRequest, Limits, check_request, is_deterministic, resolve_max_tokens

log = logging.getLogger(__name__)
audit_log = logging.getLogger("llmmesh.audit")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
REQUESTS = Counter("llmmesh_requests", "Finished requests by gRPC status", ["method", "code"])
TTFT = Histogram("llmmesh_time_to_first_token_seconds", "Time to the first streamed text", buckets=LATENCY_BUCKETS)
E2E = Histogram("llmmesh_e2e_request_latency_seconds", "Whole request latency", buckets=LATENCY_BUCKETS)
GENERATED = Counter("llmmesh_generation_tokens", "Completion tokens returned to clients")
PROMPT = Counter("llmmesh_prompt_tokens", "Prompt tokens received")


@dataclass(frozen=True)
class GatewayConfig:
    model: str
    limits: Limits = Limits()
    response_cache: bool = True
    shared_response_cache: bool = False  # one response cache for all tenants (off: each tenant its own)
    shared_prefix_cache: bool = False  # tenants reuse each other's cached prompt blocks (off: each its own)
    default_timeout_s: float = 600.0  # when the client sets no deadline
    audit_prompts: bool = False  # audit lines never carry prompt text unless this is set
    redact_personal_data: bool = False  # e-mails, phones, cards, IBANs out of audit lines (redact.py)
    prefix_routing: bool = True  # prefer the replica that holds the prompt's prefix (routing.py)
    tokenizer_timeout_s: float = 5.0  # one tokenizer call (or stream reply) waits this long at most
    shard_first_message_timeout_s: float = 60.0  # queue + prefill; past it the next replica is tried


@contextlib.asynccontextmanager
async def _status_of(method: str, context: grpc.aio.ServicerContext):
    """Turn the request path's outcome into a gRPC status, counted by method and code. Nothing
    unexpected reaches the client as a stack trace: it is logged and answered INTERNAL."""
    code = grpc.StatusCode.OK
    try:
        yield
    except RpcError as exc:
        code = exc.code
        await context.abort(exc.code, str(exc), exc.trailing_metadata)
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", method)
        await context.abort(code, "internal error in the gateway; see its log")
    finally:
        REQUESTS.labels(method, code.name).inc()


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    return next((v for k, v in context.invocation_metadata() or () if k == key), None)


class GatewayServicer(ConversationRpcs, gateway_pb2_grpc.GatewayServicer):
    _status_of = staticmethod(_status_of)

    def __init__(self, config: GatewayConfig, tokenizer: tokenizer_pb2_grpc.TokenizerStub,
                 cache: HashRing[cache_pb2_grpc.CacheStub] | None, shards: ShardPool, api_keys: ApiKeys | None = None,
                 rate_limiter: TenantRateLimiter | None = None, vocabulary: TokenizerMirror | None = None,
                 store=None):
        """vocabulary: the tokenizer's vocabulary held here (text without a round trip per step); None:
        every request detokenizes through the tokenizer service. store: the ConversationStore of
        stored turns (None: the gateway keeps none)."""
        self.config = config
        self.api_keys = api_keys or ApiKeys({})
        self.admission = Admission(self.api_keys, rate_limiter or TenantRateLimiter())
        self.affinity = PrefixAffinity() if config.prefix_routing else None
        self.tokenizer = tokenizer
        self.vocabulary = vocabulary
        self.cache = cache
        self.shards = shards
        self.conversations = Conversations(store, self, config.model)
        self.choice_streams = ChoiceStreams(shards, self.affinity, vocabulary, tokenizer, config.tokenizer_timeout_s,
                                            config.shard_first_message_timeout_s)

    # --- RPCs ---

    async def GenerateStream(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async with _status_of("GenerateStream", context):
            async for chunk in self._grpc_turn(request, context):
                yield chunk

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        answer, response_id = Answer(max(request.sampling.n, 1)), ""
        async with _status_of("Generate", context):
            async for chunk in self._grpc_turn(request, context):
                answer.add(chunk)
                response_id = chunk.response_id or response_id
        response = answer.response()
        response.response_id = response_id
        return response

    def _grpc_turn(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        tenant = self._tenant(context)
        if is_stored_turn(request):
            return self.stored_turn(request, context.time_remaining(), tenant)
        return self.generate(request, context.time_remaining(), tenant, "grpc")

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return self.authenticate(_metadata(context, "authorization"))

    # --- the request path, shared by the gRPC and HTTP fronts ---

    def authenticate(self, authorization: str | None) -> str:
        """The caller's tenant, from an `authorization: Bearer KEY` value; RpcError if refused."""
        try:
            tenant = self.api_keys.authenticate(bearer_token(authorization))
        except AuthError as exc:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        trace.get_current_span().set_attribute("llmmesh.tenant", tenant)
        return tenant

    async def generate(self, request: gateway_pb2.GenerateRequest, timeout_s: float | None,
                       tenant: str = "anonymous", front: str = "grpc", continuation: Continuation | None = None):
        """Stream GenerateStreamResponse chunks for one request; raises RpcError for the caller.
        Writes one audit line per request, whatever its outcome."""
        start = time.monotonic()
        # The client's request_id is a label (checked below); the shard knows this call by its own id,
        # so calls that share a label never share a stream, a cancel or a resume.
        request.request_id = request.request_id or uuid.uuid4().hex
        call_id = uuid.uuid4().hex
        status, last = "OK", None
        timeout = timeout_s if timeout_s is not None else self.config.default_timeout_s
        try:
            async with self.admission.admit(request, tenant, timeout) as admitted:
                async for chunk in self._generate(request, admitted.timeout_s, call_id, tenant, admitted.priority,
                                                  admitted.weight, continuation):
                    last = chunk
                    yield chunk
        except RpcError as exc:
            status = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.admission.charge(tenant, last.usage if last is not None and last.HasField("usage") else None)
            self._audit(request, call_id, tenant, front, status, last, time.monotonic() - start)

    def _audit(self, request, call_id: str, tenant: str, front: str, status: str, last, duration_s: float) -> None:
        usage = last.usage if last is not None and last.HasField("usage") else None
        fields = {
            "event": "request", "request_id": request.request_id, "call_id": call_id, "tenant": tenant, "front": front,
            "priority": (PRIORITY_CLASSES[request.priority] if request.priority < len(PRIORITY_CLASSES)
                         else request.priority) if request.HasField("priority") else None,
            "model": self.config.model, "status": status, "duration_ms": round(duration_s * 1000, 1),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cached_tokens": usage.cached if usage else None,
            "from_response_cache": usage.from_response_cache if usage else None,
            "finish_reason": last.finish_reason if last is not None and last.finish_reason else None,
        }
        if self.config.audit_prompts:
            prompt = request.prompt or [{"role": m.role, "content": m.content} for m in request.messages]
            fields["prompt"] = redact_value(prompt) if self.config.redact_personal_data else prompt
        audit_log.info("request %s %s", request.request_id, status, extra={"fields": fields})

    async def _generate(self, request: gateway_pb2.GenerateRequest, timeout_s: float | None, call_id: str,
                        tenant: str, priority: int = 0, weight: float = 1.0,
                        continuation: Continuation | None = None):
        start = time.monotonic()
        deadline = start + (timeout_s if timeout_s is not None else self.config.default_timeout_s)
        span = trace.get_current_span()
        try:
            check_request(request, self.config.limits)
        except InvalidRequest as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        tool_names = frozenset(t.name for t in request.tools) if tool_mode(request) != "none" else None
        request_id = request.request_id
        span.set_attribute("llmmesh.request_id", request_id)
        span.set_attribute("llmmesh.call_id", call_id)

        prompt_ids, tokenizer_version, tool_format = await encode_prompt(
            self.tokenizer, request, deadline, self.config.tokenizer_timeout_s, continuation)
        # In the format the prompt asked for; part of the request from here on: the shard and the cache key see it.
        calls_grammar = tool_grammar(request, tool_format)
        if calls_grammar is not None:
            request.sampling.structured.lark = calls_grammar
        info = await self._shard_info(deadline)
        try:
            max_tokens = resolve_max_tokens(request.sampling, len(prompt_ids), info.max_model_len, self.config.limits)
        except InvalidRequest as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        PROMPT.inc(len(prompt_ids))
        span.set_attribute("llmmesh.prompt_tokens", len(prompt_ids))

        key, lookup = None, None
        if (self.cache is not None and self.config.response_cache and is_deterministic(request.sampling)
                and continuation is None):
            scope = "" if self.config.shared_response_cache else tenant
            if request.cache_salt:  # a hit must not tell one salt what another asked either
                scope = cache_scope(scope, request.cache_salt).decode()
            key = response_key(self.config.model, prompt_ids, request.sampling, max_tokens, scope)
            # Asked while the shard call starts: a miss costs no round trip before the first token,
            # a hit costs the shard a call cancelled at once.
            lookup = asyncio.ensure_future(lookup_response(self.cache, key))

        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.max_tokens = max_tokens
        n = max(sampling.n, 1)
        # Whose cached prompt blocks this request may reuse: its tenant's (and its salt's) unless shared.
        prefix_scope = cache_scope(tenant, request.cache_salt, self.config.shared_prefix_cache)
        # Whose earlier answers the shard's speculation may propose: the response cache's scope.
        answer_scope = cache_scope(tenant, request.cache_salt, self.config.shared_response_cache)
        hashes = PrefixAffinity.hashes(prompt_ids, info.block_size, prefix_scope) if self.affinity is not None else []
        # One replica for every choice: it prefills the prompt once for all of them.
        order = (self.affinity.order(self.shards.replicas, hashes, tenant) if self.affinity is not None
                 else self.shards.ordered(tenant))
        calls = [ChoiceCall(i, request_id, call_id, prompt_ids, choice_sampling(sampling, i), tokenizer_version,
                            deadline, order, hashes, tenant, priority, weight, tool_names, continuation is not None,
                            prefix_scope, answer_scope, tool_format)
                 for i in range(n)]
        streams = [self.choice_streams.stream(c, list(request.sampling.stop)) for c in calls]
        messages = streams[0] if n == 1 else merge_choices(streams)
        if lookup is not None:
            messages = StartedStream(messages)  # the shard call starts while the cache is asked
            try:
                cached = await lookup
            except BaseException:  # the client left while the cache was asked: its shard call goes too
                await messages.aclose()
                raise
            span.set_attribute("llmmesh.response_cache_hit", cached is not None)
            if cached is not None:
                await messages.aclose()
                u = cached.usage
                usage = common_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                         cached=u.prompt_tokens + u.completion_tokens, from_response_cache=True)
                TTFT.observe(time.monotonic() - start, trace_exemplar())
                E2E.observe(time.monotonic() - start, trace_exemplar())
                for chunk in replay(cached, request_id, usage):
                    yield chunk
                return
        tally, first = UsageTally(n, len(prompt_ids)), True
        answer = tally.answer
        try:
            async for chunk in messages:
                if first and (chunk.text or chunk.finish_reason):
                    first = False
                    TTFT.observe(time.monotonic() - start, trace_exemplar())
                yield tally.add(chunk)
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(exc, "tokenizer") from None
        finally:
            await messages.aclose()
        GENERATED.inc(answer.completion_tokens)
        E2E.observe(time.monotonic() - start, trace_exemplar())
        if key is not None:
            # After the last message went out, before the call closes: the client already has its
            # answer, and a finished call means the next identical request hits.
            value = answer.response()
            value.request_id = ""
            value.usage.cached = 0
            await store_response(self.cache, key, value)

    async def count_prompt_tokens(self, request: gateway_pb2.GenerateRequest, timeout_s: float | None) -> int:
        """The request's prompt in tokens, as its generation would see it; nothing is generated."""
        try:
            check_request(request, self.config.limits)
        except InvalidRequest as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.config.default_timeout_s)
        prompt_ids, _, _ = await encode_prompt(self.tokenizer, request, deadline, self.config.tokenizer_timeout_s)
        return len(prompt_ids)

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs shown per token)."""
        try:
            reply = await self.tokenizer.TokenTexts(tokenizer_pb2.DecodeRequest(token_ids=token_ids),
                                                    timeout=self.config.tokenizer_timeout_s)
            message_counts.round_trip("tokenizer")
        except grpc.aio.AioRpcError as exc:
            raise downstream_error(exc, "tokenizer") from None
        return list(reply.texts)

    async def _shard_info(self, deadline: float) -> shard_pb2.ShardInfo:
        try:
            return await self.shards.info(timeout=min(5.0, max(deadline - time.monotonic(), 0.001)))
        except NoShardAvailable as exc:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
