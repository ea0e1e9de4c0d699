"""The response cache: its keys (a deterministic request, greedy or seeded, on the same model with
the same tokens and sampling gets the same answer) and its calls, best effort: a slow or absent
cache never fails a request."""

from __future__ import annotations

import array
import hashlib
import json
import logging

import grpc
from opentelemetry import trace

from llmmesh.v1 import cache_pb2, common_pb2, gateway_pb2
from services.gateway import message_counts

log = logging.getLogger(__name__)
CACHE_TIMEOUT_S = 0.25  # a slow cache must not cost more than this


def response_key(model: str, token_ids: list[int], s: common_pb2.SamplingParams, max_tokens: int,
                 scope: str = "") -> bytes:
    """scope: who may be answered from the entry (a tenant; "" for everyone): a tenant must not learn
    from a cache hit that another one asked the same thing."""
    sampling = {
        "max_tokens": max_tokens,
        "temperature": round(s.temperature, 6),
        "top_p": round(s.top_p if 0 < s.top_p < 1 else 1.0, 6),
        "top_k": s.top_k,
        "min_p": round(s.min_p, 6),
        "seed": s.seed if s.HasField("seed") else None,
        "stop": list(s.stop),
        "repetition_penalty": round(s.repetition_penalty or 1.0, 6),
        "logprobs": s.logprobs,
        "presence_penalty": round(s.presence_penalty, 6),
        "frequency_penalty": round(s.frequency_penalty, 6),
        "logit_bias": sorted((t, round(b, 6)) for t, b in s.logit_bias.items()),
        "min_tokens": s.min_tokens,
        "ignore_eos": s.ignore_eos,
        "stop_token_ids": list(s.stop_token_ids),
        "top_logprobs": s.top_logprobs,
        "raw_logprobs": s.raw_logprobs,
        "prompt_logprobs": s.prompt_logprobs,
        "n": max(s.n, 1),
        "structured": s.structured.SerializeToString(deterministic=True).hex() if s.HasField("structured") else None,
    }
    h = hashlib.sha256(b"llmmesh-response-v2\0")  # v2: seeded draws are counter-based (sampler.py)
    h.update(model.encode() + b"\0")
    h.update(scope.encode() + b"\0")
    h.update(array.array("I", token_ids).tobytes())
    h.update(json.dumps(sampling, sort_keys=True).encode())
    return h.digest()


async def lookup_response(caches, key: bytes) -> gateway_pb2.GenerateResponse | None:
    """caches: a HashRing of cache stubs."""
    with trace.get_tracer(__name__).start_as_current_span("cache.lookup") as span:
        try:
            reply = await caches.get(key).GetResponse(cache_pb2.GetResponseRequest(key=key), timeout=CACHE_TIMEOUT_S)
            message_counts.round_trip("cache")
        except grpc.aio.AioRpcError as exc:
            span.set_attribute("llmmesh.cache_error", exc.code().name)
            return None
        span.set_attribute("llmmesh.hit", reply.found)
        if not reply.found:
            return None
        return gateway_pb2.GenerateResponse.FromString(reply.value)


async def store_response(caches, key: bytes, value: gateway_pb2.GenerateResponse) -> None:
    try:
        await caches.get(key).PutResponse(cache_pb2.PutResponseRequest(key=key, value=value.SerializeToString()),
                                          timeout=CACHE_TIMEOUT_S)
        message_counts.round_trip("cache")
    except grpc.aio.AioRpcError as exc:
        log.info("response cache put failed: %s", exc.code().name)
