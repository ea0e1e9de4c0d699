"""The store's database connection: SQLite (embedded, WAL) or PostgreSQL, both through SQLAlchemy's
asyncio engine, so no query blocks the gateway's event loop. The schema is brought up to date on the
first use rather than at start: a database that is down then does not stop the gateway from serving
requests that store nothing, and it is tried again on the next request that needs it.

The database is probed (a `SELECT 1` twice a second, watch_forever; two failures in a row mark it
down) and a request that finds it unreachable marks it so too; while it is, requests that need it are refused at once with a retry delay
instead of each waiting out --store-timeout, and served again from the first probe that passes. A
write refused for want of space is that write's failure only: reads go on, and the next write tries."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
from pathlib import Path

from prometheus_client import Counter, Gauge
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import create_async_engine

from services.gateway.store.schema import migrate

log = logging.getLogger(__name__)
STORE_ERRORS = Counter("llmmesh_store_errors", "Conversation store transactions that failed: the database was "
                       "unreachable, did not answer in time, or was known down", ["dialect"])


PROBE_INTERVAL_S = 0.5
PROBE_FAILURES_DOWN = 2
STORE_UP = Gauge("llmmesh_conversation_store_up", "1 while the conversation store's database answers its probe")
# SQLSTATE classes of a database that is away, not of a bad statement: connection exceptions (08),
# operator intervention (57: shutting down, starting up, killed), insufficient resources (53).
UNAVAILABLE_SQLSTATES = ("08", "57", "53")
AWAY = "is unreachable"


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (or did not answer in time), or cannot take this write now.
    retry_after_s: set when the database is known down (a probe will tell when it is back)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def engine_url(location: str) -> str:
    """A store location as a SQLAlchemy URL with an asyncio driver: sqlite:///FILE, a bare file path,
    or postgresql://USER:PASSWORD@HOST:PORT/DB."""
    if location.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + location.split("://", 1)[1]
    if location.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + location[len("sqlite:///"):]
    if "://" in location:
        return location  # already names a driver
    return f"sqlite+aiosqlite:///{location}"


class Database:
    def __init__(self, location: str, timeout_s: float = 5.0):
        self.url = engine_url(location)
        self.timeout_s = timeout_s
        self.dialect = self.url.split("+", 1)[0].split(":", 1)[0]
        if self.dialect == "sqlite":
            Path(self.url.split(":///", 1)[1]).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_async_engine(self.url, connect_args={"timeout": timeout_s})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            self._probe_engine = create_async_engine(self.url, connect_args={"timeout": timeout_s})
        else:
            connect_args = {"timeout": timeout_s, "command_timeout": timeout_s}
            self.engine = create_async_engine(self.url, pool_pre_ping=True, pool_timeout=timeout_s,
                                              connect_args=connect_args)
            # The probe's own connection: requests that hold every pooled one make the pool busy, not
            # the database down.
            self._probe_engine = create_async_engine(self.url, pool_pre_ping=True, pool_size=1, max_overflow=0,
                                                     connect_args=connect_args)
        self._ready = False
        self._migrating = asyncio.Lock()
        self.up, self.down_reason, self._failed_checks = True, "", 0
        STORE_UP.set(1)

    @contextlib.asynccontextmanager
    async def transaction(self):
        """One transaction, the schema made current first; StoreUnavailable when the database is down
        (at once while it is known to be), or out of space for this write."""
        self.refuse_if_down()
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                if not self._ready:
                    await self._migrate()
                async with self.engine.begin() as conn:
                    yield conn
        except Exception as exc:  # noqa: BLE001 - sorted by _fault; a statement's own fault is re-raised
            fault = _fault(exc)
            if fault is None:
                raise
            STORE_ERRORS.labels(self.dialect).inc()
            if fault == AWAY:
                self._set_up(False, _reason(exc))
            raise StoreUnavailable(f"the conversation store ({self.dialect}) {fault}: {_reason(exc)}") from None

    def refuse_if_down(self) -> None:
        """StoreUnavailable, with a retry delay, while the database is known to be down."""
        if not self.up:
            STORE_ERRORS.labels(self.dialect).inc()  # counted as before: each request the store failed
            raise StoreUnavailable(f"the conversation store ({self.dialect}) is unreachable (its last check "
                                   f"failed: {self.down_reason})", PROBE_INTERVAL_S)

    async def check(self) -> bool:
        """One probe: whether the database answers a query within --store-timeout, as a request must.
        Two failures in a row mark it down (one slow answer on a loaded machine, or a first connection
        that also reads the server's settings, is not an outage); a request that finds it unreachable
        marks it down at once, and one probe that passes marks it up."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._probe_engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - whatever the failure, the database did not answer
            self._failed_checks += 1
            if self._failed_checks >= PROBE_FAILURES_DOWN:
                self._set_up(False, _reason(exc))
            return False
        self._failed_checks = 0
        self._set_up(True)
        return True

    async def watch_forever(self, interval_s: float = PROBE_INTERVAL_S) -> None:
        while True:
            await self.check()
            await asyncio.sleep(interval_s)

    def _set_up(self, up: bool, reason: str = "") -> None:
        if up != self.up:
            log.log(logging.INFO if up else logging.WARNING, "the conversation store (%s) is %s%s", self.dialect,
                    "up" if up else "down: ", reason)
        self.up, self.down_reason = up, reason
        STORE_UP.set(1 if up else 0)

    async def _migrate(self) -> None:
        async with self._migrating:
            if self._ready:
                return
            async with self.engine.begin() as conn:
                found = await conn.run_sync(migrate)
            log.info("conversation store (%s) ready; schema was version %d", self.dialect, found)
            self._ready = True

    async def close(self) -> None:
        await self.engine.dispose()
        await self._probe_engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: readers never wait for the writer; NORMAL sync is durable against a killed process.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a PostgreSQL error, raw (asyncpg's, e.g. while connecting) or wrapped by SQLAlchemy."""
    return str(getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(exc, "sqlstate", None) or "")


def _fault(exc: BaseException) -> str | None:
    """How a failed transaction failed, as a phrase for its message: the database is out of space
    (this write's failure only; reads go on), busy (this request's failure only), or away (down, restarting, connection lost). None: the statement's own fault."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    if (code == sqlite3.SQLITE_FULL or _sqlstate(exc) == "53100"
            or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)):
        return "is out of space, so nothing of this request was stored"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or isinstance(exc, PoolTimeout):
        return "is busy"  # every connection in use past the timeout, or SQLite's lock held that long
    if (isinstance(exc, (OperationalError, InterfaceError, OSError, TimeoutError))
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
            or _sqlstate(exc).startswith(UNAVAILABLE_SQLSTATES)):
        return AWAY
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

