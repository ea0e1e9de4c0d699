"""Stored conversations through the mesh: the Responses and Conversations APIs (the official
`openai` package) and their gRPC face, on a real PostgreSQL server shared by two gateways and on
SQLite across a gateway restart."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.auth import hash_key
from services.gateway.store.sealing import new_key_line
from services.launcher import wait_healthy
from services.tokenizer.text import Message, TextTokenizer

from .conftest import REAL_MODEL_DIR, free_ports, metric
from .postgres import postgres_bin

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(postgres_bin() is None, reason="no PostgreSQL server (apt-get install postgresql)")]
ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
KEY_A, KEY_B = "sk-conv-team-a", "sk-conv-team-b"
QUESTIONS = ["Hi! My name is Ana and I like the sea.", "What is my name?", "Name a fish that lives in the sea.",
             "Tell me one fact about it.", "Where could I see one?", "What should I bring to the beach?",
             "Is the sea salty?", "Why?", "Thank you. What did I say I like?", "Goodbye!"]
TURN_TOKENS = 24


class Gateway:
    """A gateway process over the session mesh's tokenizer, cache and shards."""

    def __init__(self, mesh, root: Path, name: str, store: str, extra: list[str] = ()):
        self.mesh, self.root, self.name, self.store, self.extra = mesh, root, name, store, list(extra)
        self.grpc_port, self.http_port = free_ports(2)
        self.proc = None

    def start(self) -> "Gateway":
        p = self.mesh.plan
        log = open(self.root / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--listen", f"127.0.0.1:{self.grpc_port}",
             "--http-listen", f"127.0.0.1:{self.http_port}", "--api-keys-file", str(self.root / "keys"),
             "--model-name", MODEL, "--tokenizer", p.tokenizer.listen, "--cache", p.cache.listen,
             "--shards", ",".join(s.listen for s in p.shards), "--conversation-store", self.store,
             "--store-key-file", str(self.root / "store-keys"), "--store-timeout", "2", *self.extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_healthy(f"127.0.0.1:{self.grpc_port}", 60, self.proc)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def client(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key=key, max_retries=0,
                             timeout=120)

    def stub(self):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        return channel, gateway_pb2_grpc.GatewayStub(channel)


def write_key_files(root: Path) -> Path:
    """team-a's and team-b's API keys (root/keys) and the store's sealing key (root/store-keys)."""
    (root / "keys").write_text(f"team-a {hash_key(KEY_A)}\nteam-b {hash_key(KEY_B)}\n")
    (root / "store-keys").write_text(new_key_line("k1") + "\n")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_key_files(tmp_path_factory.mktemp("conversations"))


@pytest.fixture(scope="module")
def pg_gateways(mesh, root, postgres):
    """Two gateways sharing one PostgreSQL store."""
    gateways = [Gateway(mesh, root, f"pg-{i}", postgres.url).start() for i in range(2)]
    yield gateways
    for g in gateways:
        g.stop()


def full_history_reference(stub, questions: list[str]) -> tuple[list[str], list[list[int]]]:
    """Each turn's greedy answer with the whole history resent as chat messages (gRPC, which also
    returns the answer's token ids), and those ids."""
    messages, answers, ids = [], [], []
    for q in questions:
        messages.append(common_pb2.ChatMessage(role="user", content=q))
        reply = stub.Generate(gateway_pb2.GenerateRequest(
            messages=messages, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=TURN_TOKENS)),
            metadata=(("authorization", f"Bearer {KEY_A}"),), timeout=60)
        answers.append(reply.text)
        ids.append(list(reply.token_ids))
        messages.append(common_pb2.ChatMessage(role="assistant", content=reply.text))
    return answers, ids


def first_retokenized_turn(questions: list[str], answers: list[str], answer_ids: list[list[int]]) -> int:
    """The first turn whose answer, resent as text in the next turn's history, encodes to other tokens
    than the model made; len(questions) if none. Up to that turn, a resent history is token for token
    what a stored conversation continues; from the next turn on the two prompts differ."""
    tokenizer = TextTokenizer(REAL_MODEL_DIR)
    messages = []
    for i, (q, a) in enumerate(zip(questions, answers)):
        messages.append(Message("user", q))
        made = tokenizer.encode_chat(messages) + answer_ids[i]
        messages.append(Message("assistant", a))
        resent = tokenizer.encode_chat(messages + [Message("user", "next")])
        if resent[:len(made)] != made:
            return i
    return len(questions)


def test_ten_turns_stored_equal_full_histories(pg_gateways):
    a, b = pg_gateways
    channel, stub = a.stub()
    with channel:
        reference, reference_ids = full_history_reference(stub, QUESTIONS)
    same_prompts_until = first_retokenized_turn(QUESTIONS, reference, reference_ids)

    chained, previous, usage = [], None, []
    for i, q in enumerate(QUESTIONS):
        # Alternate gateways: the chain lives in the shared store, not in a gateway's memory.
        reply = (a if i % 2 == 0 else b).client().responses.create(
            model=MODEL, input=q, previous_response_id=previous, max_output_tokens=TURN_TOKENS, temperature=0)
        chained.append(reply.output_text)
        usage.append(reply.usage)
        previous = reply.id
    # Equal while the resent history is the same tokens; a stored conversation keeps the model's own
    # tokens after that (re-encoding its text would give others: see first_retokenized_turn).
    assert chained[:same_prompts_until + 1] == reference[:same_prompts_until + 1]

    conversation = b.client().conversations.create(metadata={"topic": "sea"})
    in_conversation = []
    for i, q in enumerate(QUESTIONS):
        reply = (b if i % 2 == 0 else a).client().responses.create(
            model=MODEL, input=q, conversation=conversation.id, max_output_tokens=TURN_TOKENS, temperature=0)
        in_conversation.append(reply.output_text)
    assert in_conversation == chained  # the same history, kept two ways
    items = list(a.client().conversations.items.list(conversation.id, order="asc"))
    assert [(i.role, i.content[0].text) for i in items] == [
        (role, text) for q, r in zip(QUESTIONS, chained) for role, text in (("user", q), ("assistant", r))]
    # Each turn found the whole previous turn (prompt and answer, all but its last token, whole
    # blocks of 16) cached on the shard: the history's token ids were reused exactly.
    for before, now in zip(usage, usage[1:]):
        assert now.input_tokens_details.cached_tokens >= (before.input_tokens + before.output_tokens - 1) // 16 * 16
    # Those blocks wait on the shards' retained list, evicted after every other free block.
    assert sum(metric(s.metrics_port, "llmmesh_kv_blocks_retained") for s in a.mesh.plan.shards) > 0
    # and the cache service keeps the copies it was sent last too.
    assert metric(a.mesh.plan.cache.metrics_port, "llmmesh_cache_bytes", store="kv_retained") > 0


def test_streamed_turn_events_and_grpc_continuation(pg_gateways):
    a, b = pg_gateways
    events = list(a.client().responses.create(model=MODEL, input="Say hello to Ana.", max_output_tokens=16,
                                              temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete") and "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text
    assert a.client().responses.retrieve(final.id).output_text == deltas

    # The same store over gRPC: continue that response, read it back, delete it.
    channel, stub = b.stub()
    with channel:
        auth = (("authorization", f"Bearer {KEY_A}"),)
        turn = stub.Generate(gateway_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="And to Bob?")], previous_response_id=final.id,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=16)), metadata=auth, timeout=60)
        assert turn.response_id.startswith("resp_") and turn.text
        stored = stub.GetResponse(gateway_pb2.StoredResponseRequest(id=turn.response_id), metadata=auth, timeout=10)
        assert stored.previous_response_id == final.id
        assert [m.content for m in stored.input] == ["And to Bob?"] and stored.output[0].content == turn.text
        stream = list(stub.GenerateStream(gateway_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="And to Bob?")], previous_response_id=final.id,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=16)), metadata=auth, timeout=60))
        assert "".join(c.text for c in stream) == turn.text  # greedy: the same continuation
        assert [bool(c.response_id) for c in stream] == [False] * (len(stream) - 1) + [True]
        conv = stub.CreateConversation(gateway_pb2.CreateConversationRequest(
            messages=[common_pb2.ChatMessage(role="system", content="Answer in one word.")]), metadata=auth, timeout=10)
        stub.Generate(gateway_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="Capital of France?")], conversation=conv.id,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=8)), metadata=auth, timeout=60)
        listed = stub.ListConversationItems(gateway_pb2.ConversationRequest(id=conv.id), metadata=auth, timeout=10)
        assert [m.role for m in listed.messages] == ["system", "user", "assistant"]
        assert stub.DeleteResponse(gateway_pb2.StoredResponseRequest(id=turn.response_id), metadata=auth,
                                   timeout=10).deleted
        with pytest.raises(grpc.RpcError) as gone:
            stub.GetResponse(gateway_pb2.StoredResponseRequest(id=turn.response_id), metadata=auth, timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_tenants_see_only_their_own(pg_gateways):
    a, _ = pg_gateways
    mine = a.client(KEY_A).responses.create(model=MODEL, input="My card is 4111 1111 1111 1111.", max_output_tokens=4,
                                            temperature=0, metadata={"case": "42"})
    conv = a.client(KEY_A).conversations.create(items=[{"type": "message", "role": "user", "content": "secret"}])
    other = a.client(KEY_B)
    for call in (lambda: other.responses.retrieve(mine.id), lambda: other.responses.delete(mine.id),
                 lambda: other.responses.input_items.list(mine.id), lambda: other.conversations.retrieve(conv.id),
                 lambda: other.conversations.items.list(conv.id), lambda: other.conversations.delete(conv.id),
                 lambda: other.responses.create(model=MODEL, input="x", previous_response_id=mine.id),
                 lambda: other.responses.create(model=MODEL, input="x", conversation=conv.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    kept = a.client(KEY_A).responses.retrieve(mine.id)  # untouched by the attempts
    assert kept.id == mine.id and kept.metadata == {"case": "42"} and kept.output_text == mine.output_text


def test_erasure_and_bad_input(pg_gateways, postgres):
    a, _ = pg_gateways
    client = a.client()
    reply = client.responses.create(model=MODEL, input="Remember the word PELICAN.", max_output_tokens=4,
                                    temperature=0)
    conv = client.conversations.create()
    client.responses.create(model=MODEL, input="Hello", conversation=conv.id, max_output_tokens=4, temperature=0)
    client.responses.delete(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(conv.id)
    dump = postgres.dump()
    assert reply.id.encode() not in dump and conv.id.encode() not in dump  # gone from the database

    with pytest.raises(openai.BadRequestError, match="not both"):
        client.responses.create(model=MODEL, input="x", previous_response_id=reply.id, conversation=conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.responses.create(model=MODEL, input="x", tools=[{"type": "function", "name": "f", "parameters": {}}])
    with pytest.raises(openai.BadRequestError, match="input_image"):
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}])
    long = client.conversations.create(items=[{"role": "user", "content": "word " * 9000}])
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens; the model's context is \d+ tokens"):
        client.responses.create(model=MODEL, input="Summarise.", conversation=long.id, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.create(model=MODEL, input="x", background=True)


def test_conversation_items_through_the_sdk(pg_gateways):
    a, b = pg_gateways
    conv = a.client().conversations.create(items=[{"type": "message", "role": "user", "content": "first"}],
                                           metadata={"ticket": "1"})
    assert b.client().conversations.update(conv.id, metadata={"ticket": "2"}).metadata == {"ticket": "2"}
    added = b.client().conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "second"}]},
        {"type": "message", "role": "user", "content": "third"}])
    assert [i.content[0].text for i in added.data] == ["second", "third"]
    assert a.client().conversations.items.retrieve(added.data[0].id, conversation_id=conv.id).content[0].text == "second"
    a.client().conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    page = a.client().conversations.items.list(conv.id, order="asc", limit=1)
    assert [i.content[0].text for i in page.data] == ["first"] and page.has_more
    rest = a.client().conversations.items.list(conv.id, order="asc", after=page.data[0].id)
    assert [i.content[0].text for i in rest.data] == ["third"] and not rest.has_more
    with pytest.raises(openai.NotFoundError):
        a.client().conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    with pytest.raises(openai.BadRequestError, match="limit"):
        a.client().conversations.items.list(conv.id, limit=1000)


def test_store_unreachable_fails_only_what_needs_it(mesh, root):
    closed = free_ports(1)[0]
    g = Gateway(mesh, root, "pg-down", f"postgresql://postgres@127.0.0.1:{closed}/postgres").start()
    try:
        client = g.client()
        reply = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=4, temperature=0)
        assert reply.output_text and reply.store is False
        with pytest.raises(openai.InternalServerError, match="unreachable") as refused:
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
        assert refused.value.status_code == 503
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.choices[0].message.content is not None
    finally:
        g.stop()


def test_sqlite_store_survives_a_killed_gateway(mesh, root):
    path = root / "store.sqlite3"
    g = Gateway(mesh, root, "sqlite", f"sqlite:///{path}",
                ["--redact-personal-data", "--audit-prompts", "--log-format", "json"]).start()
    try:
        events = list(g.client().responses.create(
            model=MODEL, input="My e-mail is ana@example.com and my phone +44 20 7946 0958.", max_output_tokens=12,
            temperature=0, stream=True))
        done = events[-1].response
        g.kill()  # right after the turn was reported complete
        g.start()
        stored = g.client().responses.retrieve(done.id)
        assert stored.output_text == done.output_text
        items = g.client().responses.input_items.list(done.id)
        assert items.data[0].content[0].text == "My e-mail is [EMAIL] and my phone [PHONE]."
        follow = g.client().responses.create(model=MODEL, input="Thanks", previous_response_id=done.id,
                                             max_output_tokens=4, temperature=0)
        assert follow.previous_response_id == done.id
    finally:
        g.stop()
    # The audit lines carry the prompts, redacted.
    audit = [json.loads(line) for line in (root / "sqlite.log").read_text().splitlines()
             if line.startswith("{") and '"llmmesh.audit"' in line]
    assert audit and all("ana@example.com" not in json.dumps(a) for a in audit)
    assert any("My e-mail is [EMAIL] and my phone [PHONE]." in json.dumps(a["prompt"]) for a in audit)
    # Encrypted at rest: neither the answer nor the input is in the database's files.
    raw = b"".join(p.read_bytes() for p in root.glob("store.sqlite3*"))
    assert done.output_text.encode() not in raw and b"[EMAIL]" not in raw and b"Thanks" not in raw
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == 2
