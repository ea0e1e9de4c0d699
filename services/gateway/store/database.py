"""The store's database connection: SQLite (embedded, WAL) or PostgreSQL, both through SQLAlchemy's
asyncio engine, so no query blocks the gateway's event loop. The schema is brought up to date on the
first use rather than at start: a database that is down then does not stop the gateway from serving
requests that store nothing, and it is tried again on the next request that needs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from prometheus_client import Counter
from sqlalchemy import event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from services.gateway.store.schema import migrate

log = logging.getLogger(__name__)
STORE_ERRORS = Counter("llmmesh_store_errors", "Conversation store transactions that failed: the database was "
                       "unreachable or did not answer in time", ["dialect"])


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (or did not answer in time)."""


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
        else:
            self.engine = create_async_engine(self.url, pool_pre_ping=True, pool_timeout=timeout_s,
                                              connect_args={"timeout": timeout_s, "command_timeout": timeout_s})
        self._ready = False
        self._migrating = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self):
        """One transaction, the schema made current first; StoreUnavailable when the database is down."""
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                if not self._ready:
                    await self._migrate()
                async with self.engine.begin() as conn:
                    yield conn
        except (OperationalError, InterfaceError, OSError, TimeoutError) as exc:
            STORE_ERRORS.labels(self.dialect).inc()
            raise StoreUnavailable(f"the conversation store ({self.dialect}) is unreachable: "
                                   f"{_reason(exc)}") from None

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


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: readers never wait for the writer; NORMAL sync is durable against a killed process.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

