"""gRPC front of the tokenizer: proto in, TextTokenizer / IncrementalDetokenizer, proto out."""

from __future__ import annotations

import json

import grpc
from prometheus_client import Counter

from llmmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.telemetry import tracer
from services.tokenizer.detokenizer import IncrementalDetokenizer
from services.tokenizer.text import CHAT_ROLES, ChatTemplateError, Message, TextTokenizer
from services.tokenizer.tool_prompt import Call, ToolDef

_tracer = tracer(__name__)
DETOKENIZE_STREAMS = Counter("llmmesh_detokenize_streams", "DetokenizeStream calls served (gateways that hold "
                             "the vocabulary detokenize themselves)")


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        if request.prompt and request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send either prompt or messages, not both")
        if request.context_token_ids and not request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context_token_ids continue messages, not a prompt")
        if not self._check_ids(request.context_token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context token id outside the vocabulary")
        reused = 0
        try:
            if request.messages:
                ids, reused = self.tokenizer.encode_chat_after(
                    list(request.context_token_ids), chat_messages(request.messages), tool_defs(request.tools))
            else:
                ids = self.tokenizer.encode(request.prompt)
        except ChatTemplateError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = tokenizer_pb2.EncodeResponse(token_ids=ids, tokenizer_version=self.tokenizer.version,
                                             reused_tokens=reused)
        if request.tools:
            reply.tool_call_format = self.tokenizer.tool_format
            if self.tokenizer.tool_marker_id is not None:
                reply.tool_call_marker_token = self.tokenizer.tool_marker_id
        return reply

    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context):
        if not self._check_ids(request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id outside the vocabulary")
        text = self.tokenizer.decode(list(request.token_ids), skip_special_tokens=not request.keep_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    async def DetokenizeStream(self, request_iterator, context: grpc.aio.ServicerContext):
        DETOKENIZE_STREAMS.inc()
        detokenizer = None
        tokens = 0
        with _tracer.start_as_current_span("detokenize") as span:
            async for request in request_iterator:
                if detokenizer is None:
                    detokenizer = IncrementalDetokenizer(self.tokenizer, not request.keep_special_tokens)
                if not self._check_ids(request.token_ids):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id outside the vocabulary")
                tokens += len(request.token_ids)
                text = detokenizer.push(list(request.token_ids)) if request.token_ids else detokenizer.flush()
                yield tokenizer_pb2.DetokenizeResponse(text=text)
            span.set_attribute("llmmesh.tokens", tokens)

    async def TokenTexts(self, request: tokenizer_pb2.DecodeRequest, context):
        if not self._check_ids(request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id outside the vocabulary")
        texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in request.token_ids]
        return tokenizer_pb2.TokenTextsResponse(texts=texts)

    async def Info(self, request, context):
        return tokenizer_pb2.TokenizerInfo(
            model=self.tokenizer.name,
            vocab_size=self.tokenizer.vocab_size,
            eos_token_ids=self.tokenizer.eos_token_ids,
            chat_roles=list(CHAT_ROLES),
            version=self.tokenizer.version,
            tool_call_format=self.tokenizer.tool_format,
        )

    async def GetTokenizer(self, request, context):
        return tokenizer_pb2.TokenizerFiles(tokenizer_json=self.tokenizer.tokenizer_json, version=self.tokenizer.version)

    def _check_ids(self, ids) -> bool:
        vocab = self.tokenizer.vocab_size
        return all(0 <= i < vocab for i in ids)


def chat_messages(messages) -> list[Message]:
    out = []
    for i, m in enumerate(messages):
        calls = tuple(Call(c.id, c.name, c.arguments) for c in m.tool_calls)
        for c in calls:
            _json_object(c.arguments, f"messages[{i}].tool_calls: the arguments of {c.name!r}")
        out.append(Message(m.role, m.content, calls, m.tool_call_id, m.name))
    return out


def tool_defs(tools) -> list[ToolDef]:
    return [ToolDef(t.name, t.description, _json_object(t.parameters, f"tool {t.name!r}: parameters")
                    if t.parameters else {"type": "object"}) for t in tools]


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ChatTemplateError(f"{what} must be a JSON object")
    return value
