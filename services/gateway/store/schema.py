"""The store's tables and their versioned migrations.

Content (messages, answers, token ids) lives only in `sealed` columns (sealing.py); what is in the
clear is what the store must filter on: ids, tenant, times. Each migration runs once, in order, in
one transaction, and the version it reached is recorded in llmmesh_schema; PostgreSQL gateways that
start together serialise on an advisory lock.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (Column, Connection, Float, Index, Integer, LargeBinary, MetaData, String, Table, inspect,
                        select, text)

metadata = MetaData()

schema_version = Table("llmmesh_schema", metadata, Column("version", Integer, nullable=False))

responses = Table(
    "responses", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(256), nullable=False),
    Column("conversation_id", String(64)),
    Column("previous_response_id", String(64)),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("key_id", String(64), nullable=False),  # "" : sealed without encryption
    Column("sealed", LargeBinary, nullable=False),
    Index("responses_tenant", "tenant"),
    Index("responses_conversation", "conversation_id", "created_at"),
    Index("responses_expiry", "expires_at"),
)

conversations = Table(
    "conversations", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(256), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("key_id", String(64), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Index("conversations_tenant", "tenant"),
    Index("conversations_expiry", "expires_at"),
)

conversation_items = Table(
    "conversation_items", metadata,
    Column("position", Integer, primary_key=True, autoincrement=True),  # the items' order
    Column("id", String(64), nullable=False, unique=True),
    Column("conversation_id", String(64), nullable=False),
    Column("tenant", String(256), nullable=False),
    Column("response_id", String(64)),  # the response that added it, if any
    Column("created_at", Float, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Index("items_conversation", "conversation_id", "position"),
)


def _v1_tables(conn: Connection) -> None:
    for table in (responses, conversations, conversation_items):
        table.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1_tables]  # index + 1 is the version it reaches
LATEST = len(MIGRATIONS)


def migrate(conn: Connection) -> int:
    """Bring the schema to LATEST inside the caller's transaction; returns the version found."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(7415001)"))  # one migrating gateway at a time
    if not inspect(conn).has_table(schema_version.name):
        schema_version.create(conn)
    found = conn.execute(select(schema_version.c.version)).scalar()
    if found is None:
        conn.execute(schema_version.insert().values(version=0))
        found = 0
    if found > LATEST:
        raise RuntimeError(f"the conversation store's schema is version {found}, newer than this gateway's "
                           f"{LATEST}; upgrade the gateway")
    for version in range(found, LATEST):
        MIGRATIONS[version](conn)
        conn.execute(schema_version.update().values(version=version + 1))
    return found
