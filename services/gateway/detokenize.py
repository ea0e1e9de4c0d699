"""Token ids to text in the gateway: from a mirror of the tokenizer service's vocabulary (no message per
step), or through the service's DetokenizeStream; and how a client stream is closed."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import grpc
from tokenizers import Tokenizer

from llmmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.telemetry import record_span
from services.gateway import message_counts
from services.gateway.errors import RpcError
from services.tokenizer.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


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
            message_counts.sent("tokenizer")
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
        message_counts.received("tokenizer")
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


class _Vocabulary:
    """The tokenizer service's vocabulary, decoding as its TextTokenizer does."""

    def __init__(self, tokenizer_json: str):
        self._tokenizer = Tokenizer.from_str(tokenizer_json)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


class LocalDetokenizeSession:
    """DetokenizeSession's interface, computed here from a mirrored vocabulary: no message per step."""

    def __init__(self, vocabulary: _Vocabulary):
        self._detokenizer = IncrementalDetokenizer(vocabulary)
        self.started_ns = time.time_ns()
        self.tokens = 0

    async def push(self, token_ids) -> str:
        self.tokens += len(token_ids)
        return self._detokenizer.push(list(token_ids))

    async def flush(self) -> str:
        return self._detokenizer.flush()

    async def close(self) -> None:
        record_span("detokenize", self.started_ns, time.time_ns(), {"llmmesh.tokens": self.tokens,
                                                                     "llmmesh.detokenized_in": "gateway"})


class TokenizerMirror:
    """The tokenizer service's vocabulary, held by the gateway. One source of truth: it comes from the
    service (GetTokenizer), and a request uses it only when its Encode reply names the same version;
    otherwise that request detokenizes through the service while the mirror is brought up to date."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, timeout_s: float = 5.0):
        self._stub = stub
        self._timeout_s = timeout_s
        self._vocabulary: _Vocabulary | None = None
        self.version: str | None = None
        self._refreshing: asyncio.Task | None = None

    def session(self, version: str) -> LocalDetokenizeSession | None:
        """A local session for a request encoded with `version`; None (and a refresh) if it is not held."""
        if version and version == self.version and self._vocabulary is not None:
            return LocalDetokenizeSession(self._vocabulary)
        if version and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
        return None

    async def refresh(self) -> bool:
        """Fetch the service's vocabulary; False (and the old one kept) when it cannot be had."""
        try:
            files = await self._stub.GetTokenizer(tokenizer_pb2.GetTokenizerRequest(), timeout=self._timeout_s)
        except (grpc.aio.AioRpcError, RpcError) as exc:  # RpcError: no replica serves now
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
            log.info("the tokenizer's vocabulary could not be fetched (%s); detokenizing through the service",
                     code.name)
            return False
        if hashlib.sha256(files.tokenizer_json.encode()).hexdigest() != files.version:
            log.warning("the tokenizer's vocabulary does not match its version; detokenizing through the service")
            return False
        vocabulary = await asyncio.to_thread(_Vocabulary, files.tokenizer_json)
        self._vocabulary, self.version = vocabulary, files.version
        log.info("holding the tokenizer's vocabulary, version %s", files.version[:12])
        return True
