"""OpenAI-compatible HTTP front of the gateway (FastAPI on uvicorn, in the gateway's event loop).

It translates only: OpenAI JSON -> GenerateRequest -> the gateway's request path (the same auth,
limits, routing, cache, tracing and metrics as gRPC) -> OpenAI JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import propagate, trace
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.choices import Answer
from services.gateway.openai_requests import UINT32_MAX, BadParam, ChatCompletionRequest, CompletionRequest, _Common
from services.gateway.openai_logprobs import PromptPart, Tokens, chat_logprobs, completion_logprobs
from services.gateway.openai_structured import structured_output
from services.gateway.openai_tools import (add_tools, chat_message, message_tool_calls, refuse_tools_on_completions,
                                          tool_call_deltas)
from services.gateway.server import REQUESTS, GatewayServicer, RpcError

_tracer = trace.get_tracer(__name__)
MAX_TIMEOUT_S = 86400.0  # x-request-timeout above a day is a mistake, not a deadline

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers or {}

    @classmethod
    def from_rpc(cls, exc: RpcError) -> "OpenAIError":
        status, type_ = HTTP_STATUS.get(exc.code, (500, "internal_error"))
        code = "invalid_api_key" if exc.code == grpc.StatusCode.UNAUTHENTICATED else exc.code.name.lower()
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
        return cls(status, str(exc), type_, code, headers=headers)

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _sampling(req: _Common, max_tokens: int | None) -> common_pb2.SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    # OpenAI's default temperature is 1; 0 is greedy.
    s = common_pb2.SamplingParams(max_tokens=max_tokens or 0, stop=stop,
                                  temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=req.top_p or 0.0, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                                  repetition_penalty=req.repetition_penalty or 0.0,
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                  logit_bias=_logit_bias(req.logit_bias), min_tokens=req.min_tokens,
                                  ignore_eos=req.ignore_eos, stop_token_ids=_token_ids(req.stop_token_ids), n=req.n)
    if req.seed is not None:
        s.seed = req.seed
    structured = structured_output(req)
    if structured is not None:
        s.structured.CopyFrom(structured)
    return s


class _AdmitFirst:
    """ASGI middleware: before anything reads a request's body, its key (every /v1/ path), then the
    body's declared size; a body sent without one (Transfer-Encoding: chunked) is counted as it
    arrives and refused at the limit. A refusal is OpenAI-shaped and nothing else of the request is
    looked at."""

    def __init__(self, app, front: "OpenAIFront"):
        self.app = app
        self.front = front

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            try:
                if request.url.path.startswith("/v1/"):
                    request.state.tenant = self.front._authenticate(request)
                if self.front._check_size(request):
                    receive = await _bounded_body(receive, self.front.max_body_bytes)
                    if receive is None:
                        return  # the client left before its body ended: nobody to answer
            except OpenAIError as err:
                await self.front.error_response(request, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _bounded_body(receive, limit: int):
    """Read a body of undeclared length, counting its bytes as they arrive; OpenAIError 413 once they
    pass limit (the rest is never read). Returns a receive that hands the app the body, then the
    connection's later messages (its disconnect); None when the client left before the body ended."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise OpenAIError(413, f"the body passed {limit} bytes (sent chunked); at most {limit} are accepted",
                              code="request_too_large")
        if not message.get("more_body", False):
            break
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


async def _client_gone(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as strings."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) > UINT32_MAX:
            raise OpenAIError(400, f"logit_bias keys are token ids; got {key!r}", param="logit_bias")
        out[int(key)] = value
    return out


def _token_ids(ids: list[int] | None) -> list[int]:
    if any(not 0 <= i <= UINT32_MAX for i in ids or ()):
        raise OpenAIError(400, "stop_token_ids must be token ids", param="stop_token_ids")
    return list(ids or ())


class OpenAIFront:
    def __init__(self, gateway: GatewayServicer, model: str, is_serving=lambda: True, max_body_bytes: int = 4 << 20):
        self.gateway = gateway
        self.max_body_bytes = max_body_bytes
        self.model = model
        self.is_serving = is_serving
        self.created = int(time.time())
        # (path prefix, err -> (status, body)): the routes under a prefix that speak another API's errors.
        self.error_shapes: list[tuple[str, Any]] = []
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="llm-mesh OpenAI-compatible API", version="0.1.0")

        @app.exception_handler(OpenAIError)
        async def _openai_error(request: Request, exc: OpenAIError):
            return self.error_response(request, exc)

        @app.exception_handler(BadParam)
        async def _bad_param(request: Request, exc: BadParam):
            return self.error_response(request, OpenAIError(400, str(exc), param=exc.param))

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request: Request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
                ctx = first.get("ctx") or {}
                err = OpenAIError(400, f"the body is not valid JSON: {ctx.get('error', first.get('msg'))} "
                                       f"(at character {first.get('loc', ('', '?'))[-1]})")
                return self.error_response(request, err)
            param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            err = OpenAIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)
            return self.error_response(request, err)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException):
            type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
            message = {404: f"no such endpoint: {request.method} {request.url.path}",
                       405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
            err = OpenAIError(exc.status_code, message, type_, headers=getattr(exc, "headers", None))
            return self.error_response(request, err)

        app.add_middleware(_AdmitFirst, front=self)

        @app.get("/health")
        async def health():
            ok = self.is_serving()
            return JSONResponse({"status": "serving" if ok else "not serving"}, status_code=200 if ok else 503)

        @app.get("/v1/models")
        async def models(request: Request):
            self._auth(request)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id}")
        async def model(model_id: str, request: Request):
            self._auth(request)
            self._check_model(model_id)
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request):
            if body.top_logprobs and not body.logprobs:
                raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            sampling = _sampling(body, body.max_completion_tokens or body.max_tokens)
            sampling.logprobs, sampling.top_logprobs = body.logprobs, body.top_logprobs or 0
            messages = [chat_message(i, m.role, m.text(), m.tool_calls, m.tool_call_id, m.name)
                        for i, m in enumerate(body.messages)]
            grpc_request = gateway_pb2.GenerateRequest(messages=messages, sampling=sampling)
            add_tools(body, grpc_request)
            return await self._serve(request, body, grpc_request, chat=True)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            refuse_tools_on_completions(body)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise OpenAIError(400, "send one prompt per request", param="prompt")
            if body.echo and body.logprobs is not None and body.stream and body.n > 1:
                raise OpenAIError(400, "a stream with echo and logprobs carries one choice; send n=1 or stream=false",
                                  param="n")
            sampling = _sampling(body, body.max_tokens or 16)  # OpenAI's completions default
            if body.logprobs is not None:  # each token's own, and that many alternatives
                sampling.logprobs, sampling.top_logprobs = True, body.logprobs
                sampling.prompt_logprobs = body.echo
            return await self._serve(request, body, gateway_pb2.GenerateRequest(prompt=prompts[0], sampling=sampling),
                                     chat=False)

        return app

    # --- helpers ---

    async def rpc(self, awaitable):
        """awaitable's result, its RpcError as the OpenAI-shaped error."""
        try:
            return await awaitable
        except RpcError as exc:
            raise OpenAIError.from_rpc(exc) from None

    @staticmethod
    def error(exc: RpcError) -> "OpenAIError":
        return OpenAIError.from_rpc(exc)

    def error_response(self, request: Request, err: OpenAIError) -> JSONResponse:
        """err in the shape of the API the request's path speaks (OpenAI's unless error_shapes says)."""
        for prefix, shape in self.error_shapes:
            if request.url.path.startswith(prefix):
                status, body = shape(err)
                return JSONResponse(body, status_code=status, headers=err.headers)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def _model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "llmmesh"}

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise OpenAIError(404, f"the model '{model}' does not exist; this server serves '{self.model}'",
                              code="model_not_found", param="model")

    def _authenticate(self, request: Request) -> str:
        """The tenant of the request's key: `authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`."""
        api_key = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization") or (f"Bearer {api_key}" if api_key else None)
        try:
            return self.gateway.authenticate(authorization)
        except RpcError as exc:
            raise OpenAIError.from_rpc(exc) from None

    def _auth(self, request: Request) -> str:
        """The tenant the middleware authenticated (every /v1/ request passes it first)."""
        tenant = getattr(request.state, "tenant", None)
        return tenant if tenant is not None else self._authenticate(request)

    def _check_size(self, request: Request) -> bool:
        """A body declared larger than a valid request can be is refused before it is read. True: the
        body comes without a declared length (chunked) and must be counted as it is read."""
        if request.method not in ("POST", "PUT", "PATCH"):
            return False
        length = request.headers.get("content-length")
        if length is None:
            return True
        if not length.isdigit() or int(length) > self.max_body_bytes:
            raise OpenAIError(413, f"the body is {length} bytes; at most {self.max_body_bytes} are accepted",
                              code="request_too_large")
        return False

    @staticmethod
    def _timeout(request: Request) -> float | None:
        value = request.headers.get("x-request-timeout")  # seconds; the HTTP stand-in for a gRPC deadline
        try:
            seconds = float(value) if value else None
        except ValueError:
            seconds = math.nan
        if seconds is not None and not 0 < seconds <= MAX_TIMEOUT_S:  # also refuses nan
            raise OpenAIError(400, f"x-request-timeout must be a number of seconds in (0, {MAX_TIMEOUT_S}], "
                                   f"got {value!r}", param="x-request-timeout")
        return seconds

    async def _serve(self, request: Request, body: _Common, grpc_request: gateway_pb2.GenerateRequest, chat: bool):
        self._check_model(body.model)
        grpc_request.request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.priority is not None:
            grpc_request.priority = body.priority
        if body.cache_salt is not None:
            grpc_request.cache_salt = body.cache_salt
        method = "http.chat" if chat else "http.completions"
        span_name = f"POST /v1/{'chat/completions' if chat else 'completions'}"
        parent = propagate.extract(dict(request.headers))  # a caller's traceparent continues here
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._stream(request, body, grpc_request, chat, include_usage, method, span_name, parent)
            first = await anext(chunks)  # errors before the first token still get a proper status
            return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream")
        with _tracer.start_as_current_span(span_name, context=parent, kind=trace.SpanKind.SERVER):
            code = grpc.StatusCode.OK
            try:
                tenant = self._auth(request)
                answer = await self._collect_unless_abandoned(request, grpc_request, tenant)
            except RpcError as exc:
                code = exc.code
                raise OpenAIError.from_rpc(exc) from None
            finally:
                REQUESTS.labels(method, code.name).inc()
        choices = []
        for i, c in enumerate(answer.choices):
            choice: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason, "logprobs": None}
            text = "".join(c.texts)
            if grpc_request.sampling.logprobs:
                prompt = PromptPart(answer.prompt_token_ids, answer.prompt_logprobs, answer.prompt_top_logprobs)
                choice["logprobs"] = await self._logprobs(Tokens(c.token_ids, c.logprobs, c.top_logprobs), chat,
                                                          prompt if getattr(body, "echo", False) else None)
            if chat:
                choice["message"] = {"role": "assistant", "content": text or None if c.tool_calls else text}
                if c.tool_calls:
                    choice["message"]["tool_calls"] = message_tool_calls(c.tool_calls)
            else:
                choice["text"] = grpc_request.prompt + text if getattr(body, "echo", False) else text
            choices.append(choice)
        return {"id": grpc_request.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": choices, "usage": _usage(answer.usage)}

    async def _collect_unless_abandoned(self, request: Request, grpc_request, tenant: str, chunks=None):
        """The whole answer, gathered; a client that hangs up first cancels it (the shard stops within
        a step, as for a cancelled stream) and gets CANCELLED. chunks: the stream to gather (default:
        the request path's for grpc_request)."""

        async def collect():
            answer = Answer(max(grpc_request.sampling.n, 1))
            stream = chunks if chunks is not None else self.gateway.generate(grpc_request, self._timeout(request),
                                                                             tenant, "http")
            async for chunk in stream:
                answer.add(chunk)
            return answer

        answer, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
        if not answer.done() or answer.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await answer
            raise RpcError(grpc.StatusCode.CANCELLED, "the client closed the connection")
        return answer.result()

    async def _stream(self, request, body, grpc_request, chat, include_usage, method, span_name,
                      parent) -> AsyncIterator[str]:
        """SSE lines. The first is yielded only once the first chunk arrived (or failed)."""
        rid, created = grpc_request.request_id, int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        code = grpc.StatusCode.OK
        with _tracer.start_as_current_span(span_name, context=parent, kind=trace.SpanKind.SERVER):
            try:
                tenant = self._auth(request)
                first, usage, started, calls_sent = True, None, set(), {}
                echo = grpc_request.prompt if getattr(body, "echo", False) else None
                async for chunk in self.gateway.generate(grpc_request, self._timeout(request), tenant, "http"):
                    choice: dict[str, Any] = {"index": chunk.index, "finish_reason": chunk.finish_reason or None,
                                              "logprobs": None}
                    opening = chunk.index not in started
                    started.add(chunk.index)
                    if chat:
                        choice["delta"] = {"content": chunk.text, **({"role": "assistant"} if opening else {})}
                        if chunk.tool_calls:
                            sent = calls_sent.get(chunk.index, 0)
                            choice["delta"]["tool_calls"] = tool_call_deltas(chunk.tool_calls, sent)
                            calls_sent[chunk.index] = sent + len(chunk.tool_calls)
                    else:
                        choice["text"] = echo + chunk.text if echo is not None and opening else chunk.text
                    if grpc_request.sampling.logprobs and (chunk.token_ids or chunk.prompt_token_ids):
                        prompt = PromptPart(chunk.prompt_token_ids, chunk.prompt_logprobs, chunk.prompt_top_logprobs)
                        choice["logprobs"] = await self._logprobs(
                            Tokens(chunk.token_ids, chunk.logprobs, chunk.top_logprobs), chat,
                            prompt if echo is not None and chunk.prompt_token_ids else None)
                    first = False
                    if chunk.HasField("usage"):
                        usage = _usage(chunk.usage)
                    yield _sse({"id": rid, "object": obj, "created": created, "model": self.model, "choices": [choice]})
                if include_usage and usage is not None:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": self.model, "choices": [],
                                "usage": usage})
                yield "data: [DONE]\n\n"
            except RpcError as exc:
                code = exc.code
                if first:
                    raise OpenAIError.from_rpc(exc) from None
                # The status line is gone: the error travels as an event, as OpenAI's API does.
                yield _sse(OpenAIError.from_rpc(exc).body())
                yield "data: [DONE]\n\n"
            finally:
                REQUESTS.labels(method, code.name).inc()

    async def _logprobs(self, tokens: Tokens, chat: bool, prompt: PromptPart | None = None) -> dict:
        parts = [tokens] if prompt is None else [prompt.as_tokens(), tokens]
        ids = sorted({i for part in parts for i in part.all_ids()})
        try:
            text_of = dict(zip(ids, await self.gateway.token_texts(ids))) if ids else {}
        except RpcError as exc:
            raise OpenAIError.from_rpc(exc) from None
        return chat_logprobs(tokens, text_of) if chat else completion_logprobs(parts, text_of)


def _usage(u: common_pb2.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached if not u.from_response_cache else u.prompt_tokens}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's event loop: the gateway owns the signals and the drain."""

    def capture_signals(self):
        import contextlib

        return contextlib.nullcontext()


def make_http_server(front: OpenAIFront, host: str, port: int, tls=None) -> EmbeddedServer:
    """tls: the gateway's TlsFiles; HTTPS with the same certificate as its gRPC port."""
    ssl = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)} if tls is not None else {}
    config = uvicorn.Config(front.app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=30, **ssl)
    return EmbeddedServer(config)
