"""Stored responses and conversations, each row its tenant's: every query names the tenant, so
another tenant's id reads as absent. Rows hold OpenAI-shaped items (and a turn's token ids) sealed
at rest (sealing.py); optional redaction takes personal data out before anything is written."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import delete, literal, select

from services.gateway.redact import redact_value
from services.gateway.store.database import Database
from services.gateway.store.schema import conversation_items, conversations, responses
from services.gateway.store.sealing import Sealer

MAX_CHAIN = 10_000  # previous_response_id links followed at most (a loop in the data cannot hang)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class History:
    """What a new turn continues: the items so far, oldest first, and the token ids the model saw
    and made in the latest stored turn (empty when none, or when redaction makes them unusable)."""

    items: list[dict] = field(default_factory=list)
    context_ids: list[int] = field(default_factory=list)


@dataclass
class Turn:
    """One finished response, as saved: the caller's new input items and the response object."""

    response: dict  # the Responses API object (its id, output, usage, ...)
    input_items: list[dict]
    context_ids: list[int]  # prompt + generated token ids
    conversation_id: str | None = None
    previous_response_id: str | None = None


class ConversationStore:
    def __init__(self, database: Database, sealer: Sealer | None = None, retention_s: float | None = None,
                 redact: bool = False):
        self.db = database
        self.sealer = sealer or Sealer()
        self.retention_s = retention_s
        self.redact = redact

    async def close(self) -> None:
        await self.db.close()

    # --- sealing ---

    def _seal(self, table: str, row_id: str, tenant: str, value) -> dict:
        if self.redact:
            value = redact_value(value)
        key_id, sealed = self.sealer.seal(value, f"{table}:{row_id}:{tenant}")
        return {"key_id": key_id, "sealed": sealed}

    def _open(self, table: str, row) -> dict:
        return self.sealer.open(row.key_id, row.sealed, f"{table}:{row.id}:{row.tenant}")

    def _expiry(self, now: float) -> float | None:
        return now + self.retention_s if self.retention_s else None

    # --- responses ---

    async def save_turn(self, tenant: str, turn: Turn) -> None:
        """The response and, in a conversation, its input and output items: one transaction."""
        now = time.time()
        response_id = turn.response["id"]
        # Redacted text no longer matches the token ids: the next turn re-encodes the stored text.
        context = [] if self.redact else turn.context_ids
        doc = {"response": turn.response, "input_items": turn.input_items, "context_ids": context}
        async with self.db.transaction() as conn:
            if turn.conversation_id is not None and not await self._owns(conn, conversations, turn.conversation_id,
                                                                          tenant, lock=True):
                raise KeyError(turn.conversation_id)  # deleted while the turn ran
            await conn.execute(responses.insert().values(
                id=response_id, tenant=tenant, conversation_id=turn.conversation_id,
                previous_response_id=turn.previous_response_id, created_at=now, expires_at=self._expiry(now),
                **self._seal("responses", response_id, tenant, doc)))
            if turn.conversation_id is not None:
                await self._insert_items(conn, tenant, turn.conversation_id,
                                         turn.input_items + turn.response["output"], response_id, now)

    async def get_response(self, tenant: str, response_id: str) -> dict | None:
        """{"response": ..., "input_items": [...], "context_ids": [...]}, or None."""
        async with self.db.transaction() as conn:
            row = (await conn.execute(select(responses).where(responses.c.id == response_id,
                                                               responses.c.tenant == tenant))).first()
        return self._open("responses", row) if row is not None else None

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        async with self.db.transaction() as conn:
            gone = await conn.execute(delete(responses).where(responses.c.id == response_id,
                                                              responses.c.tenant == tenant))
            await conn.execute(delete(conversation_items).where(conversation_items.c.response_id == response_id,
                                                                conversation_items.c.tenant == tenant))
        return gone.rowcount > 0

    async def response_history(self, tenant: str, response_id: str) -> History | None:
        """The items of the chain ending at response_id (its inputs and outputs, and those of every
        response before it), with that response's token ids; None if it is not the tenant's. One
        recursive query; a deleted response ends the chain (the history starts after it)."""
        c = responses.c
        chain = select(c.id, c.previous_response_id, literal(0).label("depth")).where(
            c.id == response_id, c.tenant == tenant).cte("chain", recursive=True)
        chain = chain.union_all(select(c.id, c.previous_response_id, chain.c.depth + 1).where(
            c.id == chain.c.previous_response_id, c.tenant == tenant, chain.c.depth < MAX_CHAIN))
        query = select(responses).join(chain, c.id == chain.c.id).order_by(chain.c.depth.desc())
        async with self.db.transaction() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return None
        docs = [self._open("responses", row) for row in rows]
        items = [item for doc in docs for item in doc["input_items"] + doc["response"]["output"]]
        return History(items, docs[-1]["context_ids"])

    # --- conversations ---

    async def create_conversation(self, tenant: str, metadata: dict, items: list[dict]) -> dict:
        now = time.time()
        conversation = {"id": new_id("conv"), "object": "conversation", "created_at": int(now),
                        "metadata": metadata}
        async with self.db.transaction() as conn:
            await conn.execute(conversations.insert().values(
                id=conversation["id"], tenant=tenant, created_at=now, expires_at=self._expiry(now),
                **self._seal("conversations", conversation["id"], tenant, conversation)))
            await self._insert_items(conn, tenant, conversation["id"], items, None, now)
        return conversation

    async def get_conversation(self, tenant: str, conversation_id: str) -> dict | None:
        async with self.db.transaction() as conn:
            row = await self._conversation_row(conn, tenant, conversation_id)
        return self._open("conversations", row) if row is not None else None

    async def update_conversation(self, tenant: str, conversation_id: str, metadata: dict) -> dict | None:
        async with self.db.transaction() as conn:
            row = await self._conversation_row(conn, tenant, conversation_id)
            if row is None:
                return None
            conversation = {**self._open("conversations", row), "metadata": metadata}
            await conn.execute(conversations.update().where(conversations.c.id == conversation_id).values(
                **self._seal("conversations", conversation_id, tenant, conversation)))
        return conversation

    async def delete_conversation(self, tenant: str, conversation_id: str) -> bool:
        """The conversation, its items and the responses made in it."""
        async with self.db.transaction() as conn:
            gone = await conn.execute(delete(conversations).where(conversations.c.id == conversation_id,
                                                                  conversations.c.tenant == tenant))
            if gone.rowcount:
                await conn.execute(delete(conversation_items).where(
                    conversation_items.c.conversation_id == conversation_id))
                await conn.execute(delete(responses).where(responses.c.conversation_id == conversation_id,
                                                           responses.c.tenant == tenant))
        return gone.rowcount > 0

    async def add_items(self, tenant: str, conversation_id: str, items: list[dict]) -> list[dict] | None:
        async with self.db.transaction() as conn:
            if not await self._owns(conn, conversations, conversation_id, tenant, lock=True):
                return None
            return await self._insert_items(conn, tenant, conversation_id, items, None, time.time())

    async def list_items(self, tenant: str, conversation_id: str, limit: int = 20, after: str | None = None,
                         descending: bool = False) -> tuple[list[dict], bool] | None:
        """A page of items and whether more follow; None if the conversation is not the tenant's."""
        c = conversation_items.c
        async with self.db.transaction() as conn:
            if not await self._owns(conn, conversations, conversation_id, tenant):
                return None
            query = select(conversation_items).where(c.conversation_id == conversation_id)
            if after is not None:
                mark = (await conn.execute(select(c.position).where(c.id == after, c.conversation_id ==
                                                                     conversation_id))).scalar()
                if mark is not None:
                    query = query.where(c.position < mark if descending else c.position > mark)
            query = query.order_by(c.position.desc() if descending else c.position).limit(limit + 1)
            rows = (await conn.execute(query)).all()
        return [self._open("conversation_items", r) for r in rows[:limit]], len(rows) > limit

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> dict | None:
        c = conversation_items.c
        async with self.db.transaction() as conn:
            row = (await conn.execute(select(conversation_items).where(
                c.id == item_id, c.conversation_id == conversation_id, c.tenant == tenant))).first()
        return self._open("conversation_items", row) if row is not None else None

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str) -> bool:
        c = conversation_items.c
        async with self.db.transaction() as conn:
            gone = await conn.execute(delete(conversation_items).where(
                c.id == item_id, c.conversation_id == conversation_id, c.tenant == tenant))
        return gone.rowcount > 0

    async def conversation_history(self, tenant: str, conversation_id: str) -> History | None:
        """Every item of the conversation, with the token ids of its latest stored response."""
        c = conversation_items.c
        async with self.db.transaction() as conn:
            if not await self._owns(conn, conversations, conversation_id, tenant):
                return None
            rows = (await conn.execute(select(conversation_items).where(c.conversation_id == conversation_id)
                                       .order_by(c.position))).all()
            # The latest turn is the last one in the conversation's order (its commit order), not
            # the one whose save started last.
            latest_id = next((r.response_id for r in reversed(rows) if r.response_id), None)
            latest = None if latest_id is None else (await conn.execute(select(responses).where(
                responses.c.id == latest_id, responses.c.tenant == tenant))).first()
        context = self._open("responses", latest)["context_ids"] if latest is not None else []
        return History([self._open("conversation_items", r) for r in rows], context)

    # --- erasure and retention ---

    async def delete_tenant(self, tenant: str) -> dict[str, int]:
        """Everything one tenant stored."""
        counts = {}
        async with self.db.transaction() as conn:
            for table in (conversation_items, responses, conversations):
                counts[table.name] = (await conn.execute(delete(table).where(table.c.tenant == tenant))).rowcount
        return counts

    async def purge_expired(self, now: float | None = None) -> dict[str, int]:
        """Responses and conversations past their expiry (and the items of those conversations)."""
        now = time.time() if now is None else now
        counts = {}
        async with self.db.transaction() as conn:
            expired = select(conversations.c.id).where(conversations.c.expires_at < now)
            counts["conversation_items"] = (await conn.execute(delete(conversation_items).where(
                conversation_items.c.conversation_id.in_(expired)))).rowcount
            for table in (responses, conversations):
                counts[table.name] = (await conn.execute(delete(table).where(table.c.expires_at < now))).rowcount
        return counts

    # --- helpers ---

    async def _conversation_row(self, conn, tenant: str, conversation_id: str):
        return (await conn.execute(select(conversations).where(conversations.c.id == conversation_id,
                                                               conversations.c.tenant == tenant))).first()

    async def _owns(self, conn, table, row_id: str, tenant: str, lock: bool = False) -> bool:
        """lock: hold the row until the transaction ends. Appends to one conversation then take their
        positions one transaction after the other, so its order is their commit order, each turn's
        items together (PostgreSQL hands out positions as rows are inserted, not as they commit;
        SQLite has one writer at a time anyway)."""
        query = select(table.c.id).where(table.c.id == row_id, table.c.tenant == tenant)
        found = await conn.execute(query.with_for_update() if lock else query)
        return found.first() is not None

    async def _insert_items(self, conn, tenant: str, conversation_id: str, items: list[dict],
                            response_id: str | None, now: float) -> list[dict]:
        stored = []
        for item in items:
            item = {**item, "id": item.get("id") or new_id("msg")}
            stored.append(item)
            await conn.execute(conversation_items.insert().values(
                id=item["id"], conversation_id=conversation_id, tenant=tenant, response_id=response_id,
                created_at=now, **self._seal("conversation_items", item["id"], tenant, item)))
        return stored
