"""The conversation store under its own faults, with the real servers: a stopped PostgreSQL (stored
requests refused at once, stateless ones served), a killed one under concurrent stored turns (each turn
stored whole or reported failed, the gateway reconnecting by itself), two gateways appending to the same
conversations (each conversation's order its commit order), and SQLite on a full disk.

The shard runs a tiny random Llama with the real tokenizer's vocabulary: these tests are about the
store's plumbing, not the model's answers."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from services.launcher import Mesh, plan_mesh

from .conftest import INTERNAL_TOKEN, free_ports, metric, wait_for
from .postgres import postgres_bin
from .test_conversations import MODEL, Gateway, write_key_files

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(postgres_bin() is None, reason="no PostgreSQL server (apt-get install postgresql)")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_key_files(tmp_path_factory.mktemp("store-faults"))


@pytest.fixture(scope="module")
def mesh(real_model_dir, vocab_sized_tiny_model, root):
    ports = free_ports(4)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, 0], gateway_metrics_port=0, shard_args=["--kv-cache-mb", "64"],
                     gateway_args=["--conversation-store", "none"],
                     internal_token=INTERNAL_TOKEN)  # the gateways started beside it have the session's
    shard = plan.shards[0]
    shard.args[shard.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    with Mesh(plan, log_dir=root).start(timeout=120) as m:
        yield m


@pytest.fixture(scope="module")
def gateways(mesh, root, postgres):
    """Two gateways on one PostgreSQL; the first shows its metrics."""
    first_metrics = free_ports(1)[0]
    started = [Gateway(mesh, root, "pg-a", postgres.url, ["--metrics-port", str(first_metrics)]),
               Gateway(mesh, root, "pg-b", postgres.url)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(Gateway.start, started))
    started[0].metrics_port = first_metrics
    yield started
    for g in started:
        g.stop()


def _turn(gateway, conversation: str, max_tokens: int = 8, stream: bool = False):
    """One stored turn in a conversation: its response id, or the error it was refused with."""
    client = gateway.client()
    try:
        if not stream:
            return client.responses.create(model=MODEL, input="Tell me more.", conversation=conversation,
                                           max_output_tokens=max_tokens, temperature=0).id
        events = list(client.responses.create(model=MODEL, input="Tell me more.", conversation=conversation,
                                              max_output_tokens=max_tokens, temperature=0, stream=True))
        return events[-1].response.id
    except openai.APIStatusError as exc:
        return exc


def _items(postgres, conversation: str) -> list[tuple[str, str]]:
    """(item id, response id) of a conversation's items in its order."""
    return [(i, r) for i, r in postgres.sql(f"SELECT id, coalesce(response_id, '') FROM conversation_items "
                                            f"WHERE conversation_id = '{conversation}' ORDER BY position")]


def test_two_gateways_appending_to_the_same_conversations_keep_commit_order(gateways, postgres):
    conversations = [gateways[0].client().conversations.create(items=[{"role": "user", "content": "Hi"}]).id
                     for _ in range(8)]
    jobs = [(gateways[k % 2], conversations[k % 8]) for k in range(32)]
    with ThreadPoolExecutor(32) as pool:  # 32 streams, four on each conversation, across both gateways
        made = list(pool.map(lambda job: _turn(*job, max_tokens=12, stream=True), jobs))
    assert all(isinstance(r, str) and r.startswith("resp_") for r in made), made
    assert len(set(made)) == 32
    for conversation in conversations:
        items = _items(postgres, conversation)
        turns = [r for _, r in items[1:]]
        assert len(items) == 1 + 4 * 2 and len({i for i, _ in items}) == len(items)  # none lost or duplicated
        assert turns[0::2] == turns[1::2]  # each turn's input and output together
        assert set(turns) == {r for (_, c), r in zip(jobs, made) if c == conversation}
        # Positions in commit order: each row's transaction committed no earlier than the one before.
        committed = [float(c) for (c,) in postgres.sql(
            f"SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin)) FROM conversation_items "
            f"WHERE conversation_id = '{conversation}' ORDER BY position")]
        assert committed == sorted(committed)
    # What a client lists is that order, through either gateway.
    listed = [i.id for i in gateways[1].client().conversations.items.list(conversations[0], order="asc")]
    assert listed == [i for i, _ in _items(postgres, conversations[0])]


@contextlib.contextmanager
def _stopped(postgres):
    """PostgreSQL hung (SIGSTOP to every process of it): connections stay open, nothing answers."""
    processes = postgres.processes()
    for p in processes:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in processes:
            p.send_signal(signal.SIGCONT)


def _store_up(gateway) -> bool:
    return metric(gateway.metrics_port, "llmmesh_conversation_store_up") == 1


def test_a_stopped_store_refuses_stored_requests_at_once_and_serves_the_rest(gateways, postgres):
    a = gateways[0]
    client = a.client()
    kept = client.responses.create(model=MODEL, input="Remember this.", max_output_tokens=4, temperature=0)
    with _stopped(postgres):
        assert wait_for(lambda: not _store_up(a), timeout=10)
        for stored in ({"input": "Hi"}, {"input": "And then?", "previous_response_id": kept.id}):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as refused:
                client.responses.create(model=MODEL, max_output_tokens=4, temperature=0, **stored)
            took = time.monotonic() - started
            # Well under --store-timeout (2 s): nothing waited on the stopped database.
            assert refused.value.status_code == 503 and took < 1.0, (refused.value, took)
            assert "unreachable" in refused.value.message and refused.value.response.headers["retry-after"] == "1"
        assert client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=4).output_text
        assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4).choices[0].message.content is not None
    assert wait_for(lambda: _store_up(a), timeout=10)
    assert client.responses.create(model=MODEL, input="Back?", previous_response_id=kept.id,
                                   max_output_tokens=4).previous_response_id == kept.id


def test_postgres_killed_under_sixteen_stored_turns(gateways, postgres):
    a = gateways[0]
    conversations = [a.client().conversations.create(items=[{"role": "user", "content": "Hi"}]).id
                     for _ in range(16)]
    done, succeeded = threading.Condition(), []

    def turn(k: int):
        result = _turn(a, conversations[k], max_tokens=4 + 8 * k)  # they finish one after another
        with done:
            if isinstance(result, str):
                succeeded.append(result)
            done.notify_all()
        return result

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(turn, k) for k in range(16)]
        with done:
            assert done.wait_for(lambda: len(succeeded) >= 4, timeout=60)
        postgres.kill()  # while the others generate or save
        results = [f.result(timeout=120) for f in futures]
    failed = [r for r in results if not isinstance(r, str)]
    assert failed and len(failed) < 16, results
    for r in failed:  # reported to the caller as the store's fault, never a hang or a 500
        assert r.status_code == 503 and "conversation store" in r.message, r
    # While it is down, a new stored turn is refused before anything is generated.
    assert wait_for(lambda: not _store_up(a), timeout=10)
    started = time.monotonic()
    refused = _turn(a, conversations[0], max_tokens=200)
    assert isinstance(refused, openai.APIStatusError) and refused.status_code == 503, refused
    assert refused.response.headers["retry-after"] == "1" and time.monotonic() - started < 1.0
    postgres.restart()
    for conversation, result in zip(conversations, results):
        items = _items(postgres, conversation)
        stored = postgres.sql(f"SELECT id FROM responses WHERE conversation_id = '{conversation}'")
        # Stored whole (the turn's response and both its items) or not at all, never twice.
        assert (len(items), len(stored)) in ((1, 0), (3, 1)), (items, stored)
        if isinstance(result, str):
            assert stored == [[result]] and [r for _, r in items[1:]] == [result, result]
        # A failed turn is not stored, unless its commit landed and only its acknowledgement was lost.
    # The gateway reconnects by itself: its probe sees the server back, and turns are stored again.
    assert wait_for(lambda: _store_up(a), timeout=10)
    again = _turn(a, conversations[-1])
    assert isinstance(again, str), again
    assert len(_items(postgres, conversations[-1])) in (3, 5)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the full-disk test needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1):  # large writes, then the last bytes
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_sqlite_on_a_full_disk(mesh, root, small_disk):
    path = small_disk / "store.sqlite3"
    g = Gateway(mesh, root, "sqlite-full", f"sqlite:///{path}").start()
    try:
        client = g.client()
        first = client.responses.create(model=MODEL, input="Before the disk fills.", max_output_tokens=4,
                                        temperature=0)
        with sqlite3.connect(path) as db:  # nothing left in the WAL file: the next write needs new space
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = _fill(small_disk)
        with pytest.raises(openai.APIStatusError) as refused:
            client.responses.create(model=MODEL, input="While it is full.", max_output_tokens=4, temperature=0)
        assert refused.value.status_code == 503 and "out of space" in refused.value.message, refused.value
        with pytest.raises(openai.APIStatusError) as refused:
            client.conversations.create(items=[{"role": "user", "content": "x" * 20_000}])
        assert refused.value.status_code == 503 and "out of space" in refused.value.message, refused.value
        # Reads and stateless requests go on meanwhile.
        assert client.responses.retrieve(first.id).output_text == first.output_text
        assert client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=4).output_text
        filler.unlink()  # space returns: the next write succeeds, no restart
        later = client.responses.create(model=MODEL, input="After.", previous_response_id=first.id,
                                        max_output_tokens=4, temperature=0)
        assert client.responses.retrieve(later.id).previous_response_id == first.id
    finally:
        g.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == 2  # nothing of the refused turn
        assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0
