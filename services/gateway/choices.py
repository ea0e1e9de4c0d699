"""The choices of one request (sampling.n): their seeds, their streams merged into one, and the whole
answer gathered from the stream (for unary replies and the response cache).

Choice i of a seeded request samples with seed + i (mod 2^64), so it gets exactly the tokens of a
request with n = 1 and that seed, whatever else is batched. Each choice is its own shard call with the
same prompt, sent to the same replica: the shard prefills the prompt once and the choices share its
KV blocks (scheduler.py), and a choice whose shard is lost resumes on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.tools import new_call_id

SEED_MASK = (1 << 64) - 1


def choice_sampling(sampling: common_pb2.SamplingParams, index: int) -> common_pb2.SamplingParams:
    """What the shard call for choice `index` samples with: the request's parameters, n = 1, its seed,
    and the prompt's log-probabilities asked of choice 0 only."""
    own = common_pb2.SamplingParams()
    own.CopyFrom(sampling)
    own.n = 0
    if sampling.HasField("seed"):
        own.seed = (sampling.seed + index) & SEED_MASK
    if index:
        own.prompt_logprobs = False
    return own


_END = object()


class StartedStream:
    """An async iterator whose first message is asked for at once, in a task of its own, so the calls
    behind it run while the caller awaits something else (the response-cache lookup). aclose() stops
    it wherever it is."""

    def __init__(self, source: AsyncIterator):
        self._source = source
        self._first: asyncio.Future | None = asyncio.ensure_future(self._next())

    async def _next(self):
        return await anext(self._source, _END)

    def __aiter__(self) -> "StartedStream":
        return self

    async def __anext__(self):
        if self._first is not None:
            item = await self._first
            self._first = None
        else:
            item = await self._next()
        if item is _END:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            first.cancel()
            await asyncio.wait([first])
            if not first.cancelled():
                first.exception()  # retrieved: an error no one reads any more is not logged as lost
        await self._source.aclose()


async def merge_choices(streams: list[AsyncIterator[gateway_pb2.GenerateStreamResponse]]):
    """Messages of every stream as they come. The first stream to fail ends the merge with its error;
    leaving the merge early (a client's cancel) cancels every stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for chunk in stream:
                await queue.put(chunk)
            await queue.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


@dataclass
class _Choice:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[common_pb2.TopLogprobs] = field(default_factory=list)
    tool_calls: list[common_pb2.ToolCall] = field(default_factory=list)
    finish_reason: str = ""
    stop_sequence: str = ""


class Answer:
    """A request's stream gathered into its whole answer, choice by choice."""

    def __init__(self, n: int):
        self.n = n
        self.choices = [_Choice() for _ in range(n)]
        self.prompt_token_ids: list[int] = []
        self.prompt_logprobs: list[float] = []
        self.prompt_top_logprobs: list[common_pb2.TopLogprobs] = []
        self.usage: common_pb2.Usage | None = None
        self.request_id = ""
        self.finished = 0

    def add(self, chunk: gateway_pb2.GenerateStreamResponse) -> None:
        choice = self.choices[chunk.index]
        choice.texts.append(chunk.text)
        choice.token_ids.extend(chunk.token_ids)
        choice.logprobs.extend(chunk.logprobs)
        choice.top_logprobs.extend(chunk.top_logprobs)
        choice.tool_calls.extend(chunk.tool_calls)
        self.prompt_token_ids.extend(chunk.prompt_token_ids)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        self.prompt_top_logprobs.extend(chunk.prompt_top_logprobs)
        self.request_id = chunk.request_id or self.request_id
        if chunk.finish_reason:
            choice.finish_reason, choice.stop_sequence = chunk.finish_reason, chunk.stop_sequence
            self.finished += 1
        if chunk.HasField("usage"):
            self.usage = chunk.usage

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def response(self) -> gateway_pb2.GenerateResponse:
        """Choice 0 in the top-level fields; with n > 1 every choice in `choices` too."""
        first = self.choices[0]
        out = gateway_pb2.GenerateResponse(
            text="".join(first.texts), token_ids=first.token_ids, finish_reason=first.finish_reason,
            request_id=self.request_id, logprobs=first.logprobs, top_logprobs=first.top_logprobs,
            prompt_logprobs=self.prompt_logprobs, prompt_top_logprobs=self.prompt_top_logprobs,
            prompt_token_ids=self.prompt_token_ids, tool_calls=first.tool_calls, stop_sequence=first.stop_sequence)
        if self.usage is not None:
            out.usage.CopyFrom(self.usage)
        if self.n > 1:
            out.choices.extend(
                gateway_pb2.Choice(index=i, text="".join(c.texts), token_ids=c.token_ids, finish_reason=c.finish_reason,
                                   logprobs=c.logprobs, top_logprobs=c.top_logprobs, tool_calls=c.tool_calls,
                                   stop_sequence=c.stop_sequence)
                for i, c in enumerate(self.choices))
        return out


def replay(cached: gateway_pb2.GenerateResponse, request_id: str, usage: common_pb2.Usage):
    """A response-cache entry as the stream that made it: one message per choice, usage on the last.
    Tool calls get new ids: a caller keys its results by them."""
    choices = list(cached.choices) or [gateway_pb2.Choice(
        index=0, text=cached.text, token_ids=cached.token_ids, finish_reason=cached.finish_reason,
        logprobs=cached.logprobs, top_logprobs=cached.top_logprobs, tool_calls=cached.tool_calls,
        stop_sequence=cached.stop_sequence)]
    for i, c in enumerate(choices):
        chunk = gateway_pb2.GenerateStreamResponse(
            index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason, request_id=request_id,
            logprobs=c.logprobs, top_logprobs=c.top_logprobs, stop_sequence=c.stop_sequence,
            tool_calls=[common_pb2.ToolCall(id=new_call_id(), name=t.name, arguments=t.arguments) for t in c.tool_calls])
        if i == 0:
            chunk.prompt_token_ids.extend(cached.prompt_token_ids)
            chunk.prompt_logprobs.extend(cached.prompt_logprobs)
            chunk.prompt_top_logprobs.extend(cached.prompt_top_logprobs)
        if i == len(choices) - 1:
            chunk.usage.CopyFrom(usage)
        yield chunk


class UsageTally:
    """A request's messages passing out, with its usage put on the very last one: the prompt's tokens,
    every choice's completion tokens, and the prompt tokens the shard had cached (the least any choice
    found; each choice's first message reports its own, which is taken off). Gathers the answer too."""

    def __init__(self, n: int, prompt_tokens: int):
        self.answer = Answer(n)
        self.prompt_tokens = prompt_tokens
        self._cached: list[int] = []

    def add(self, chunk: gateway_pb2.GenerateStreamResponse) -> gateway_pb2.GenerateStreamResponse:
        if chunk.HasField("usage"):
            self._cached.append(chunk.usage.cached)
            chunk.ClearField("usage")
        if chunk.finish_reason and self.answer.finished == self.answer.n - 1:
            chunk.usage.CopyFrom(common_pb2.Usage(
                prompt_tokens=self.prompt_tokens, cached=min(self._cached, default=0),
                completion_tokens=self.answer.completion_tokens + len(chunk.token_ids)))
        self.answer.add(chunk)
        return chunk
