"""Anthropic's Messages API on the HTTP front: POST /v1/messages (unary, or streamed as Anthropic's
server-sent events) and POST /v1/messages/count_tokens.

Translation only (anthropic_requests.py builds the GenerateRequest): a request runs the gateway's
request path like an OpenAI chat completion (the same keys and tenants, limits, routing, caches, tool
calls, tracing and metrics). Keys come as `x-api-key` or `authorization: Bearer`; `anthropic-version`
is accepted whatever its value. Errors have Anthropic's shape, {"type": "error", "error": {"type",
"message"}}, with its codes: 529 overloaded_error when no shard can serve, 504 timeout_error.

Out: content blocks in the order the answer made them (text runs as text blocks, each call a tool_use
block, whole once the call is), stop_reason end_turn | max_tokens | stop_sequence (with the string)
| tool_use. Usage: input_tokens are the prompt tokens no cache held, cache_read_input_tokens the rest.
A stream's message_start is sent with the first tokens; its input_tokens are 0 until message_delta,
which carries the whole usage.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from opentelemetry import propagate, trace
from pydantic import ValidationError

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.anthropic_requests import CountTokensRequest, MessagesRequest, generate_request
from services.gateway.errors import RpcError
from services.gateway.openai_http import OpenAIError, _prepend
from services.gateway.openai_requests import BadParam
from services.gateway.server import REQUESTS

_tracer = trace.get_tracer(__name__)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
               529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_shape(err: OpenAIError) -> tuple[int, dict]:
    """An error of the front as Anthropic's API answers it: (HTTP status, body)."""
    status = 529 if err.status == 503 else err.status  # Anthropic's "overloaded"
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": str(err)}}


def add_routes(app: FastAPI, front) -> None:
    """front: the OpenAIFront (auth, model check, timeouts, the request path, error responses)."""
    front.error_shapes.append(("/v1/messages", error_shape))

    @app.post("/v1/messages")
    async def messages(request: Request):
        body = await _body(request, MessagesRequest)
        front._check_model(body.model)
        grpc_request = generate_request(body)
        grpc_request.request_id = "msg_" + uuid.uuid4().hex
        if body.stream:
            events = _events(front, request, grpc_request)
            first = await anext(events)  # a refusal before the first token keeps its HTTP status
            return StreamingResponse(_prepend(first, events), media_type="text/event-stream")
        blocks = Blocks()
        with _served(request, "http.messages"):
            tenant = front._auth(request)
            chunks = _fed(blocks, front.gateway.generate(grpc_request, front._timeout(request), tenant, "http"))
            await front._collect_unless_abandoned(request, grpc_request, tenant, chunks)
        blocks.finish()
        return blocks.message(grpc_request.request_id, front.model)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        body = await _body(request, CountTokensRequest)
        front._check_model(body.model)
        with _served(request, "http.count_tokens"):
            front._auth(request)
            count = await front.gateway.count_prompt_tokens(generate_request(body), front._timeout(request))
        return {"input_tokens": count}


async def _body(request: Request, model):
    """The JSON body as `model`; a 400 naming the first field that is wrong, missing or not served."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise BadParam(f"{where}: not served by this server's Messages API", where) from None
        raise BadParam(f"{where}: {first['msg']}", where) from None


@contextlib.contextmanager
def _served(request: Request, method: str):
    """The request's span (continuing a caller's traceparent) and its count by status; its RpcError
    as the front's error."""
    code = grpc.StatusCode.OK
    parent = propagate.extract(dict(request.headers))
    with _tracer.start_as_current_span(f"POST {request.url.path}", context=parent, kind=trace.SpanKind.SERVER):
        try:
            yield
        except RpcError as exc:
            code = exc.code
            raise OpenAIError.from_rpc(exc) from None
        finally:
            REQUESTS.labels(method, code.name).inc()


async def _fed(blocks: "Blocks", chunks):
    async for chunk in chunks:
        blocks.feed(chunk)
        yield chunk


async def _events(front, request: Request, grpc_request: gateway_pb2.GenerateRequest):
    """The SSE events of a streamed message. The first is yielded once the first chunk arrived (or
    the request failed: then the error is raised, for a proper status)."""
    blocks, started = Blocks(), False
    try:
        with _served(request, "http.messages"):
            tenant = front._auth(request)
            async for chunk in front.gateway.generate(grpc_request, front._timeout(request), tenant, "http"):
                if not started:
                    started = True
                    start = blocks.message(grpc_request.request_id, front.model, streaming=True)
                    yield _sse({"type": "message_start", "message": start}) + _sse({"type": "ping"})
                for event in blocks.feed(chunk):
                    yield _sse(event)
    except OpenAIError as err:
        if not started:
            raise
        yield _sse(error_shape(err)[1])  # the status line is gone: the error travels as an event
        return
    for event in blocks.finish():
        yield _sse(event)


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class Blocks:
    """One answer's chunks as Anthropic content blocks, in the order they were made: a run of text is a
    text block, each tool call a tool_use block. feed and finish give the stream's events; message()
    the whole message (or, streaming, the one message_start carries)."""

    def __init__(self):
        self.content: list[dict[str, Any]] = []
        self.text_open = False
        self.finish_reason = self.stop_sequence = ""
        self.usage: common_pb2.Usage | None = None

    def feed(self, chunk: gateway_pb2.GenerateStreamResponse) -> list[dict]:
        events = []
        if chunk.text:
            if not self.text_open:
                events += self._start({"type": "text", "text": ""})
                self.text_open = True
            self.content[-1]["text"] += chunk.text
            events.append(_delta(len(self.content) - 1, {"type": "text_delta", "text": chunk.text}))
        for call in chunk.tool_calls:
            events += self._close_text()
            events += self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            self.content[-1]["input"] = json.loads(call.arguments)
            index = len(self.content) - 1
            events += [_delta(index, {"type": "input_json_delta", "partial_json": call.arguments}),
                       {"type": "content_block_stop", "index": index}]
        if chunk.finish_reason:
            self.finish_reason, self.stop_sequence = chunk.finish_reason, chunk.stop_sequence
        if chunk.HasField("usage"):
            self.usage = chunk.usage
        return events

    def finish(self) -> list[dict]:
        """The events that end the stream; an answer of nothing gets one empty text block."""
        events = self._close_text()
        if not self.content:
            events += self._start({"type": "text", "text": ""}) + [{"type": "content_block_stop", "index": 0}]
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": self.stop_sequence or None}
        return events + [{"type": "message_delta", "delta": delta, "usage": self.usage_dict()},
                         {"type": "message_stop"}]

    def stop_reason(self) -> str | None:
        if self.finish_reason == "stop" and self.stop_sequence:
            return "stop_sequence"
        return STOP_REASONS.get(self.finish_reason)

    def usage_dict(self) -> dict:
        u = self.usage or common_pb2.Usage()
        cached = u.prompt_tokens if u.from_response_cache else min(u.cached, u.prompt_tokens)
        return {"input_tokens": u.prompt_tokens - cached, "output_tokens": u.completion_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}

    def message(self, message_id: str, model: str, streaming: bool = False) -> dict:
        usage = {"input_tokens": 0, "output_tokens": 0} if streaming else self.usage_dict()
        return {"id": message_id, "type": "message", "role": "assistant", "model": model,
                "content": [] if streaming else self.content, "stop_reason": None if streaming else self.stop_reason(),
                "stop_sequence": None if streaming else self.stop_sequence or None, "usage": usage}

    def _start(self, block: dict) -> list[dict]:
        self.content.append(block)
        return [{"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)}]

    def _close_text(self) -> list[dict]:
        if not self.text_open:
            return []
        self.text_open = False
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]


def _delta(index: int, delta: dict) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": delta}
