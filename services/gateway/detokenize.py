"""The gateway's side of the tokenizer's DetokenizeStream, and how a client stream is closed."""

from __future__ import annotations

import asyncio

import grpc

from llmmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.gateway.errors import RpcError


async def close_stream(call, cancel: bool) -> None:
    """End a client stream so that everything wrapping it finishes too (the tracing interceptor
    ends its span when the response iterator ends): read a finished stream to EOF; cancel an
    unfinished one, then read once so the cancellation reaches the wrapper."""
    if cancel:
        call.cancel()
    try:
        async with asyncio.timeout(1.0):
            while await call.read() is not grpc.aio.EOF:
                pass
    except (grpc.aio.AioRpcError, asyncio.CancelledError, TimeoutError):
        pass


class DetokenizeSession:
    """One DetokenizeStream for one request: push token ids, get the text they complete. Each reply
    is awaited at most reply_timeout_s: a hung tokenizer fails the request instead of stalling it."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, timeout: float, reply_timeout_s: float):
        self._requests: asyncio.Queue = asyncio.Queue()
        self._call = stub.DetokenizeStream(self._iterate(), timeout=timeout)
        self._reply_timeout_s = reply_timeout_s
        self._flushed = False

    async def _iterate(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def _reply(self) -> str:
        try:
            async with asyncio.timeout(self._reply_timeout_s):
                reply = await self._call.read()
        except TimeoutError:
            raise RpcError(grpc.StatusCode.UNAVAILABLE,
                           f"the tokenizer did not answer within {self._reply_timeout_s:g}s") from None
        if reply is grpc.aio.EOF:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the tokenizer closed the detokenize stream")
        return reply.text

    async def push(self, token_ids) -> str:
        await self._requests.put(tokenizer_pb2.DetokenizeRequest(token_ids=token_ids))
        return await self._reply()

    async def flush(self) -> str:
        """An empty message asks for the text still held; then the request side closes."""
        await self._requests.put(tokenizer_pb2.DetokenizeRequest())
        text = await self._reply()
        await self._requests.put(None)
        self._flushed = True
        return text

    async def close(self) -> None:
        await self._requests.put(None)
        await close_stream(self._call, cancel=not self._flushed)
