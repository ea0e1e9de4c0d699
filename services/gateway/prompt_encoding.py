"""The encode stage: a request's prompt as token ids, from a tokenizer replica.

The chat template and tool rendering live in the tokenizer service (one source of truth), so this is
one Encode call, bounded by the tokenizer timeout and the request's deadline, tried once more on the
next replica when the connection broke before it ran. A stored conversation's next turn sends the
earlier turn's token ids along (a Continuation) and gets them back as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from llmmesh.v1 import gateway_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.gateway import message_counts
from services.gateway.errors import RpcError
from services.gateway.shard_calls import downstream_error
from services.gateway.tools import ToolFormat, tool_mode


@dataclass
class Continuation:
    """A stored conversation's next turn: the earlier turn's token ids go in (reused as they are),
    the prompt as encoded comes out. Such turns bypass the response cache, so erasing them from the
    store leaves no copy there."""

    context_ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)


async def encode_prompt(tokenizer: tokenizer_pb2_grpc.TokenizerStub, request: gateway_pb2.GenerateRequest,
                        deadline: float, timeout_s: float,
                        continuation: Continuation | None = None) -> tuple[list[int], str, ToolFormat]:
    """The prompt's token ids, the version of the vocabulary that made them, and the format its
    rendering asked the model to call tools in; RpcError for the caller (UNAVAILABLE when no tokenizer
    answered, INVALID_ARGUMENT for a prompt of no tokens)."""
    # tool_choice none: the tools are not shown, so the model does not try to call them.
    tools = request.tools if tool_mode(request) != "none" else []
    encode = tokenizer_pb2.EncodeRequest(prompt=request.prompt, messages=request.messages, tools=tools,
                                         context_token_ids=continuation.context_ids if continuation else ())
    for last_try in (False, True):
        try:
            reply = await tokenizer.Encode(encode, timeout=min(timeout_s, max(deadline - time.monotonic(), 0.001)))
            message_counts.round_trip("tokenizer")
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not last_try:
                # The call never ran (a connection that just broke, e.g. a keepalive giving up):
                # once more, on the next replica where there are several.
                continue
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < deadline:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"the tokenizer did not answer within {timeout_s:g}s") from None
            raise downstream_error(exc, "tokenizer") from None
    if not reply.token_ids:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt encodes to no tokens")
    if continuation is not None:
        continuation.prompt_ids = list(reply.token_ids)
        trace.get_current_span().set_attribute("llmmesh.reused_context_tokens", reply.reused_tokens)
    try:
        tool_format = ToolFormat.of_encoding(reply)
    except ValueError as exc:  # a tokenizer newer than this gateway: a deployment fault, not the request's
        raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
    return list(reply.token_ids), reply.tokenizer_version, tool_format
