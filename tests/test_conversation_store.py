"""The conversation store without a network: redaction, sealing, migrations, tenant scoping,
erasure and retention on SQLite and on a real PostgreSQL server; the tokenizer's reuse of a turn's
token ids; a turn's refusals."""

from __future__ import annotations

import asyncio
import base64

import grpc
import pytest

from services.gateway.conversations import Conversations
from services.gateway.errors import RpcError
from services.gateway.items import input_items, item_messages, message_item
from services.gateway.openai_requests import BadParam
from services.gateway.redact import iban_ok, luhn_ok, redact
from services.gateway.store.cli import purge_expired_forever
from services.gateway.store.database import Database, StoreUnavailable
from services.gateway.store.schema import LATEST, migrate, schema_version
from services.gateway.store.sealing import SealError, Sealer, new_key_line
from services.gateway.store.store import ConversationStore, Turn, new_id
from services.tokenizer.text import Message, TextTokenizer

from .conftest import REAL_MODEL_DIR
from .postgres import PostgresServer, postgres_bin


# --- redaction ---

@pytest.mark.parametrize("text, expected", [
    ("Mail john.doe+x@example.co.uk or call +1 (415) 555-0132.", "Mail [EMAIL] or call [PHONE]."),
    ("Card 4111 1111 1111 1111 expires soon", "Card [CARD] expires soon"),
    ("Not a card: 4111 1111 1111 1112.", "Not a card: 4111 1111 1111 1112."),
    ("IBAN GB82 WEST 1234 5698 7654 32, or DE89370400440532013000.", "IBAN [IBAN], or [IBAN]."),
    ("Not an IBAN: GB00WEST12345698765432", "Not an IBAN: GB00WEST12345698765432"),
    ("Call 020 7946 0958 today; order 12345 shipped on 2026-12-03.",
     "Call [PHONE] today; order 12345 shipped on 2026-12-03."),
    ("我的邮箱是zhang.wei@example.cn，电话13800138000，银行卡号6222021234567890128。",
     "我的邮箱是[EMAIL]，电话[PHONE]，银行卡号[CARD]。"),
    ("订单号 20231203 共 3 件，价格 129.99 元，手机 +86 138-0013-8000。",
     "订单号 20231203 共 3 件，价格 129.99 元，手机 [PHONE]。"),
])
def test_redaction(text, expected):
    assert redact(text) == expected


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB83 WEST 1234 5698 7654 32")


# --- sealing ---

def test_sealing_binds_rows_and_rotates_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(new_key_line("old") + "\n")
    old = Sealer.from_file(keys)
    key_id, sealed = old.seal({"text": "secret"}, "responses:r1:team-a")
    assert key_id == "old" and b"secret" not in sealed
    assert old.open(key_id, sealed, "responses:r1:team-a") == {"text": "secret"}
    with pytest.raises(SealError, match="tampered, or moved"):
        old.open(key_id, sealed, "responses:r1:team-b")  # another tenant's row
    keys.write_text(new_key_line("new") + "\n" + keys.read_text())  # rotate: the new key first
    rotated = Sealer.from_file(keys)
    assert rotated.open(key_id, sealed, "responses:r1:team-a") == {"text": "secret"}
    assert rotated.seal({}, "x")[0] == "new"
    with pytest.raises(SealError, match="no longer holds"):
        Sealer.from_file(tmp_path / "keys").open("gone", sealed, "x")
    (tmp_path / "short").write_text("k " + base64.b64encode(b"0" * 16).decode())
    with pytest.raises(SealError, match="AES-256 needs 32"):
        Sealer.from_file(tmp_path / "short")
    assert Sealer().seal({"a": 1}, "x") == ("", b'{"a":1}')  # no key file: plain JSON


# --- the store, on SQLite and PostgreSQL ---

@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server (apt-get install postgresql)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.sqlite3"
    return request.getfixturevalue("postgres").url


def _run(coro):
    return asyncio.run(coro)


def _turn(text: str, conversation: str | None = None, previous: str | None = None) -> Turn:
    response = {"id": new_id("resp"), "output": [message_item("assistant", text)]}
    return Turn(response, [message_item("user", "question")], [1, 2, 3], conversation, previous)


def test_store_scopes_erases_and_purges(location, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(new_key_line("k1"))

    async def scenario():
        store = ConversationStore(Database(location), Sealer.from_file(keys), retention_s=3600)
        try:
            conv = await store.create_conversation("a", {"k": "v"}, [message_item("system", "Be brief.")])
            first = _turn("one", conv["id"])
            await store.save_turn("a", first)
            second = _turn("two", conv["id"])
            await store.save_turn("a", second)
            history = await store.conversation_history("a", conv["id"])
            assert [m.content for m in item_messages(history.items)] == ["Be brief.", "question", "one", "question",
                                                                          "two"]
            assert history.context_ids == [1, 2, 3]
            page, more = await store.list_items("a", conv["id"], limit=2, descending=True)
            assert [item["content"][0]["text"] for item in page] == ["two", "question"] and more
            # Another tenant: absent, whatever it tries.
            assert await store.get_conversation("b", conv["id"]) is None
            assert await store.conversation_history("b", conv["id"]) is None
            assert await store.response_history("b", first.response["id"]) is None
            assert not await store.delete_conversation("b", conv["id"])
            with pytest.raises(KeyError):
                await store.save_turn("b", _turn("x", conv["id"]))
            # A chain of responses, its middle one deleted: the history starts after it.
            r1 = _turn("r1")
            await store.save_turn("a", r1)
            r2 = _turn("r2", previous=r1.response["id"])
            await store.save_turn("a", r2)
            r3 = _turn("r3", previous=r2.response["id"])
            await store.save_turn("a", r3)
            full = await store.response_history("a", r3.response["id"])
            assert [m.content for m in item_messages(full.items)][1::2] == ["r1", "r2", "r3"]
            assert await store.delete_response("a", r2.response["id"])
            after = await store.response_history("a", r3.response["id"])
            assert [m.content for m in item_messages(after.items)][1::2] == ["r3"]
            # Erasure of a conversation takes its items and responses.
            assert await store.delete_conversation("a", conv["id"])
            assert await store.get_response("a", first.response["id"]) is None
            assert await store.list_items("a", conv["id"]) is None
            # Retention: nothing expired now; everything once past it.
            assert not any((await store.purge_expired()).values())
            counts = await store.purge_expired(now=10**12)
            assert counts["responses"] == 2
            # One tenant's everything.
            await store.create_conversation("b", {}, [message_item("user", "hi")])
            await store.save_turn("b", _turn("theirs"))
            assert await store.delete_tenant("b") == {"conversation_items": 1, "responses": 1, "conversations": 1}
        finally:
            await store.close()

    _run(scenario())


def test_retention_purge_runs_in_the_background(tmp_path):
    async def scenario():
        store = ConversationStore(Database(f"sqlite:///{tmp_path}/s.sqlite3"), retention_s=0.001)
        turn = _turn("short-lived")
        await store.save_turn("a", turn)
        task = asyncio.create_task(purge_expired_forever(store, interval_s=0.05))
        try:
            async with asyncio.timeout(10):
                while await store.get_response("a", turn.response["id"]) is not None:
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await store.close()

    _run(scenario())


def test_encrypted_store_file_holds_no_plaintext(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(new_key_line("k1"))

    async def scenario():
        store = ConversationStore(Database(f"sqlite:///{tmp_path}/s.sqlite3"), Sealer.from_file(keys))
        await store.save_turn("a", _turn("The answer is PLAINTEXT-CANARY."))
        await store.close()

    _run(scenario())
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("s.sqlite3*"))
    assert b"PLAINTEXT-CANARY" not in raw and b"question" not in raw and len(raw) > 0


def test_migrations_are_recorded_and_a_newer_schema_is_refused(tmp_path):
    async def scenario():
        db = Database(f"sqlite:///{tmp_path}/s.sqlite3")
        async with db.transaction() as conn:
            assert await conn.run_sync(migrate) == LATEST  # already current: nothing to do
            await conn.execute(schema_version.update().values(version=LATEST + 1))
        await db.close()
        newer = Database(f"sqlite:///{tmp_path}/s.sqlite3")
        with pytest.raises(RuntimeError, match="newer than this gateway"):
            async with newer.transaction():
                pass
        await newer.close()

    _run(scenario())


def test_unreachable_database_is_unavailable_fast(tmp_path):
    from services.launcher import free_port

    async def scenario():
        from services.gateway.store.database import STORE_ERRORS

        db = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/x", timeout_s=1)
        errors = STORE_ERRORS.labels("postgresql")
        before = errors._value.get()
        try:
            async with asyncio.timeout(10):
                with pytest.raises(StoreUnavailable, match="unreachable"):
                    async with db.transaction():
                        pass
            assert errors._value.get() == before + 1  # what LLMMeshStoreErrors alerts on
        finally:
            await db.close()

    _run(scenario())


def test_a_store_known_down_is_refused_at_once_until_a_probe_passes():
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server (apt-get install postgresql)")
    server = PostgresServer()  # its port chosen, the server not started yet

    async def scenario():
        db = Database(server.url, timeout_s=5)
        try:
            assert not await db.check() and db.up  # nothing listens there; one failure is not an outage
            assert not await db.check() and not db.up
            with pytest.raises(StoreUnavailable, match="unreachable") as refused:
                async with asyncio.timeout(0.5):  # no connection attempt, no --store-timeout
                    async with db.transaction():
                        pass
            assert refused.value.retry_after_s == 0.5
            server.start()
            assert await db.check() and db.up  # the first probe that passes brings it back
            async with db.transaction() as conn:
                await conn.run_sync(lambda c: None)
        finally:
            await db.close()

    try:
        _run(scenario())
    finally:
        server.stop()


# --- a turn's history as token ids ---

def test_encode_reuses_the_previous_turns_tokens_exactly():
    tok = TextTokenizer(REAL_MODEL_DIR)
    history = [Message("user", "Tell me about the Marauder.")]
    prompt = tok.encode_chat(history)
    # The model's own split of a word, which re-encoding its text would not give back.
    answer_ids = [i for piece in ("The Mar", "a", "uder") for i in tok.tokenizer.encode(piece, add_special_tokens=False).ids]
    text = tok.decode(answer_ids)
    assert tok.tokenizer.encode(text, add_special_tokens=False).ids != answer_ids
    history += [Message("assistant", text), Message("user", "More?")]
    ids, reused = tok.encode_chat_after(prompt + answer_ids, history)
    assert reused == len(prompt) + len(answer_ids) and ids[:reused] == prompt + answer_ids
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(history)
    # A history that no longer starts with that text (other instructions): encoded afresh.
    other = [Message("system", "Be brief.")] + history
    assert tok.encode_chat_after(prompt + answer_ids, other) == (tok.encode_chat(other), 0)


# --- a turn's refusals, before anything runs ---

def test_turn_refusals():
    async def scenario():
        none = Conversations(None, gateway=None, model="m")
        with pytest.raises(RpcError) as both:
            await none.plan("a", [], previous_response_id="resp_1", conversation_id="conv_1")
        assert both.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RpcError) as no_store:
            await none.plan("a", [message_item("user", "hi")], store=True)
        assert no_store.value.code == grpc.StatusCode.FAILED_PRECONDITION
        plan = await none.plan("a", [message_item("user", "hi")], instructions="Be brief.", store=False)
        assert [(m.role, m.content) for m in plan.messages] == [("system", "Be brief."), ("user", "hi")]

    _run(scenario())
    with pytest.raises(BadParam, match="function_call"):
        input_items([{"type": "function_call", "name": "f", "arguments": "{}"}])
    with pytest.raises(BadParam, match="role"):
        input_items([{"role": "tool", "content": "x"}])
    assert [i["role"] for i in input_items([{"role": "developer", "content": [{"type": "input_text", "text": "x"}]},
                                            "ignored" and {"role": "user", "content": "y"}])] == ["developer", "user"]


def test_admin_commands_back_up_and_erase_a_tenant(tmp_path, capsys):
    from services.gateway.store.__main__ import main

    location = f"sqlite:///{tmp_path}/live.sqlite3"
    turn = _turn("kept in the backup")

    async def save():
        store = ConversationStore(Database(location))
        await store.save_turn("a", turn)
        await store.close()

    _run(save())
    assert main(["--conversation-store", location, "backup", str(tmp_path / "copy.sqlite3")]) == 0

    async def read(where: str):
        store = ConversationStore(Database(where))
        try:
            return await store.get_response("a", turn.response["id"])
        finally:
            await store.close()

    assert main(["--conversation-store", location, "delete-tenant", "a"]) == 0
    assert "'responses': 1" in capsys.readouterr().out
    assert _run(read(location)) is None
    restored = _run(read(f"sqlite:///{tmp_path}/copy.sqlite3"))  # the backup opens as a store
    assert restored["response"]["output"][0]["content"][0]["text"] == "kept in the backup"
    assert main(["--conversation-store", location, "new-key", "k9"]) == 0
    assert capsys.readouterr().out.startswith("k9 ")
