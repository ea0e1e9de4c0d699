"""The engine on its own thread, fed and drained from asyncio.

Torch releases the GIL in its kernels, so the event loop keeps serving RPCs while a step runs.
Requests and aborts enter through a queue and are applied between steps; each request's outputs
go back to the event loop on its own asyncio queue.

Every torch call of a serving process belongs on this one thread, model loading included: a
second thread running torch ops gets its own OpenMP team, and the two teams cost the engine a
fifth to a half of its speed on a small CPU. Pass a factory so the engine is built here.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from services.common.block_hash import ROOT
from services.model_shard.engine.engine import LLMEngine
from services.model_shard.engine.request import FinishReason, RequestOutput, RequestTimes, SamplingParams
from services.model_shard.engine.scheduler import QueueFullError

log = logging.getLogger(__name__)

ENGINE_THREAD_NAME = "engine"  # the engine thread's name in the OS, which its OpenMP team inherits


class EngineDeadError(RuntimeError):
    """The engine thread failed; requests on it cannot finish."""


@dataclass(frozen=True)
class StepReport:
    """What one engine step did, for whoever watches (metrics); plain numbers only."""

    num_seqs: int
    num_tokens: int
    duration_s: float


@dataclass(frozen=True)
class RequestClass:
    """Whose request it is and how urgent: the scheduler's tenant, priority and the tenant's weight."""

    tenant: str = ""
    priority: int = 0
    weight: float = 1.0
    retain_blocks: bool = False  # its KV blocks are evicted last once it ends (kv_blocks.py)
    cache_root: bytes = ROOT  # its prefix-cache scope's root: blocks are reused only within the scope
    answer_scope: bytes = b""  # whose earlier answers speculation may propose to it (proposers.py)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    trace_carrier: dict[str, str] | None
    request_class: RequestClass
    matcher: object | None
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str
    stream: _Add | None = None  # set: abort only if the id still belongs to this stream


@dataclass
class _Call:
    """Run fn(engine) between steps; its result settles `done`."""

    fn: Callable
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], ready_timeout_s: float = 600.0,
                 on_step: Callable[[StepReport], None] | None = None,
                 recover_from: tuple[type[BaseException], ...] = (),
                 on_health: Callable[[bool], None] | None = None,
                 on_prefix_change: Callable[[list[bytes], list[bytes]], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """engine: an LLMEngine, or a factory called on the engine thread (preferred, see above).
        Returns once the engine is built; raises what the factory raised.

        When a step raises one of `recover_from` (e.g. a parallel worker died), the requests in
        flight fail with EngineDeadError and the factory builds a fresh engine, again and again
        while the factory too raises one of `recover_from` (see _rebuild). on_health(False)
        is called (engine thread) when the engine fails, on_health(True) once a rebuilt one runs.
        on_prefix_change(added, removed) (engine thread) follows the prefix cache's block hashes;
        prefix_snapshot() gives the whole set, in order with those calls.

        A step that fails ends only its requests (LLMEngine.step). When the engine thread itself
        cannot go on (an error outside a step, steps failing in a row, a rebuild that failed),
        on_fatal(exc) is called (engine thread) after every waiter has been told: a serving process
        should exit then, so that whatever supervises it starts a fresh one."""
        self.engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self._factory = None if self.engine is not None else engine
        self._on_step = on_step  # called on the engine thread after each step
        self._recover_from = recover_from if self._factory is not None else ()
        self._on_health = on_health or (lambda serving: None)
        self._on_prefix_change = on_prefix_change
        self._on_fatal = on_fatal or (lambda exc: None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}  # owned by the engine thread
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout_s):
            raise TimeoutError(f"the engine was not built within {ready_timeout_s:.0f}s")
        if self.engine is None:
            raise EngineDeadError(f"the engine could not be built: {self._error}") from self._error

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        trace_carrier: dict[str, str] | None = None, request_class: RequestClass = RequestClass(), matcher=None,
    ) -> AsyncIterator[list[RequestOutput]]:
        """Yields the outputs available at each wake-up (several when the reader fell behind).

        Raises ValueError (bad request), QueueFullError, or EngineDeadError. Leaving the loop
        early (cancellation) aborts the request in the engine.
        """
        if self._error is not None:
            raise EngineDeadError(f"the engine failed: {self._error}")
        loop = asyncio.get_running_loop()
        add = _Add(request_id, prompt_token_ids, params, trace_carrier, request_class, matcher, asyncio.Queue(), loop,
                   loop.create_future())
        self._inbox.put(add)
        finished = False
        try:
            await add.accepted  # raises what add_request raised
            while not finished:
                batch = [await add.outputs.get()]
                while not add.outputs.empty():
                    batch.append(add.outputs.get_nowait())
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                finished = batch[-1].finished
                yield batch
        finally:
            if not finished:  # this stream's request only, never another one under the same id
                self._inbox.put(_Abort(request_id, add))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def cached_prefix_blocks(self, block_hashes: list[bytes]) -> int:
        """Leading blocks held by the prefix cache now (a hint, read from this thread)."""
        return self.engine.pool.count_cached_prefix(block_hashes)

    async def import_blocks(self, block_hashes: list[bytes], values: list[bytes | None]) -> int:
        """LLMEngine.import_blocks, applied between steps; returns the leading blocks cached."""
        return await self._call(lambda engine: engine.import_blocks(block_hashes, values))

    async def _call(self, fn: Callable[[LLMEngine], object]):
        """fn(engine) on the engine thread between steps; its result, or what it raised."""
        loop = asyncio.get_running_loop()
        msg = _Call(fn, loop, loop.create_future())
        self._send(msg)
        return await msg.done

    def _send(self, msg) -> None:
        """Queue a message whose future the engine thread settles. A thread that failed settles what
        it finds in its inbox; anything sent after it failed is refused here (see _run)."""
        self._inbox.put(msg)
        if self._error is not None:
            raise EngineDeadError(f"the engine failed: {self._error}")

    async def prefix_snapshot(self) -> list[bytes]:
        """Every block hash the prefix cache holds, taken between steps: on_prefix_change calls made
        after it are changes to this set."""
        return await self._call(self._snapshot)

    def _snapshot(self, engine: LLMEngine) -> list[bytes]:
        added, removed = engine.pool.take_changes()  # earlier changes go out first, then the snapshot
        if self._on_prefix_change is not None and (added or removed):
            self._on_prefix_change(added, removed)
        return engine.pool.cached_hashes()

    async def worker_places(self) -> list[tuple[int, str]]:
        """(process id, node address) of the engine's parallel workers, by rank (none for a local executor)."""
        return await self._call(lambda engine: engine.worker_places())

    async def sync(self) -> None:
        """Return once the engine thread has applied everything sent to it before this call."""
        await self._call(lambda engine: None)

    # --- engine thread ---

    def _apply(self, msg) -> None:
        if isinstance(msg, _Add):
            if msg.request_id in self._streams:  # two streams must never share one id's outputs
                msg.loop.call_soon_threadsafe(_settle, msg.accepted, ValueError(f"request id {msg.request_id!r} is in use"))
                return
            try:
                c = msg.request_class
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.trace_carrier,
                                        c.tenant, c.priority, c.weight, msg.matcher, c.retain_blocks,
                                        c.cache_root, c.answer_scope)
            except (ValueError, QueueFullError) as exc:
                msg.loop.call_soon_threadsafe(_settle, msg.accepted, exc)
                return
            self._streams[msg.request_id] = msg
            msg.loop.call_soon_threadsafe(_settle, msg.accepted, None)
        elif isinstance(msg, _Abort):
            if msg.stream is not None and self._streams.get(msg.request_id) is not msg.stream:
                return
            if self.engine.abort(msg.request_id):
                self._deliver_all([self._aborted_output(msg.request_id)])
        elif isinstance(msg, _Call):
            try:
                result = msg.fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                msg.loop.call_soon_threadsafe(_settle, msg.done, exc)
            else:
                msg.loop.call_soon_threadsafe(_settle_value, msg.done, result)

    def _aborted_output(self, request_id: str) -> RequestOutput:
        stream = self._streams[request_id]
        return RequestOutput(request_id, [], FinishReason.ABORTED, len(stream.prompt_token_ids), 0, RequestTimes())

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop for all of them,
        so every stream sees the step at once (a batch stream then sends it as one message)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.outputs, out))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_put_all, deliveries)

    def _run(self) -> None:
        _name_os_thread(ENGINE_THREAD_NAME)
        try:
            if self._factory is not None:
                self.engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            return
        finally:
            self._ready.set()
        while True:
            try:
                self._serve()
                return
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                log.exception("engine thread failed")
                self._error = exc
                self._fail_waiters(EngineDeadError(f"the engine failed: {exc}"))
                self._on_health(False)
                if not isinstance(exc, self._recover_from) or not self._rebuild():
                    log.critical("the engine cannot continue: %r", exc)
                    self._on_fatal(exc)
                    return
                self._on_health(True)

    def _serve(self) -> None:
        self.engine.pool.track_changes = self._on_prefix_change is not None
        while not self._stopped.is_set():
            # Block only when idle; otherwise take what arrived and step.
            msg = self._inbox.get() if not self.engine.has_work else self._get_nowait()
            while msg is not None:
                self._apply(msg)
                msg = self._get_nowait()
            if self.engine.has_work:
                started = time.perf_counter()
                stats = self.engine.stats
                steps, tokens, seqs = stats.steps, stats.computed_tokens, stats.scheduled_seqs
                self._deliver_all(self.engine.step())
                if self._on_step is not None and stats.steps > steps:
                    self._on_step(StepReport(stats.scheduled_seqs - seqs, stats.computed_tokens - tokens,
                                             time.perf_counter() - started))
            if self._on_prefix_change is not None:
                added, removed = self.engine.pool.take_changes()
                if added or removed:
                    self._on_prefix_change(added, removed)

    def _fail_waiters(self, dead: EngineDeadError) -> None:
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, dead)
        self._streams.clear()
        while (msg := self._get_nowait()) is not None:
            future = getattr(msg, "accepted", None) or getattr(msg, "done", None)
            if future is not None:
                msg.loop.call_soon_threadsafe(_settle, future, dead)

    def _rebuild(self) -> bool:
        """Replace the failed engine (its workers released first). A build that fails with one of
        `recover_from` (say, its workers cannot be placed while a host is down) is tried again until
        one succeeds or the engine stops; meanwhile requests are refused with that reason. False
        when a build failed otherwise, or the engine was stopped."""
        old, self.engine = self.engine, None
        if self._on_prefix_change is not None:  # a rebuilt engine starts with an empty prefix cache
            self._on_prefix_change([], old.pool.cached_hashes())
        try:
            old.shutdown()
        except Exception:  # noqa: BLE001 - what is left of it goes anyway
            log.exception("releasing the failed engine")
        while not self._stopped.is_set():
            log.info("rebuilding the engine")
            try:
                engine = self._factory()
            except self._recover_from as exc:
                self._error = exc  # what generate() tells callers until a build succeeds
                self._fail_waiters(EngineDeadError(f"the engine cannot be rebuilt yet: {exc}"))
                log.warning("not serving: the engine cannot be rebuilt yet (%s); trying again", exc)
                continue
            except BaseException:  # noqa: BLE001
                log.exception("the engine could not be rebuilt")
                return False
            self.engine = engine
            self._fail_waiters(EngineDeadError("the engine failed; it has been rebuilt"))  # sent while rebuilding
            self._error = None
            log.info("engine rebuilt")
            return True
        return False

    def _get_nowait(self):
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None


def _name_os_thread(name: str) -> None:
    """Give this thread its name in the OS too (top -H, /proc/PID/task/TID/comm), where the threads it
    starts (the engine's OpenMP team) inherit it: what the engine spends is then told apart from what
    serving it spends. Linux only; elsewhere nothing happens."""
    if sys.platform == "linux":
        PR_SET_NAME = 15
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _put_all(deliveries: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, out in deliveries:
        outputs.put_nowait(out)


def _settle_value(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
