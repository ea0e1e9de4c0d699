"""What a client must not learn or break: another scope's cached prompt blocks (tenants, cache_salt),
the server's health through its own oversized grammars, the body limit through a chunked body, and
every request's time once no tokenizer serves.

The shard runs a tiny random Llama with the real tokenizer's vocabulary: these tests are about the
mesh's plumbing, not the model's answers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.block_hash import ROOT, cache_scope, chain_block_hashes, scope_root
from services.common.errors import retry_delay_s
from services.gateway.auth import hash_key
from services.launcher import Mesh, plan_mesh, wait_healthy

from .conftest import INTERNAL_TOKEN, REAL_MODEL_DIR, ROOT as REPO, free_ports, grpc_serving, wait_for

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
KEYS = {"tenant-a": "sk-a-scopes-0123456789", "tenant-b": "sk-b-scopes-0123456789"}
MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scopes")
    (root / "keys").write_text("".join(f"{tenant} {hash_key(key)}\n" for tenant, key in KEYS.items()))
    return root


@pytest.fixture(scope="module")
def mesh(real_model_dir, vocab_sized_tiny_model, root):
    ports = free_ports(5)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, 0], gateway_metrics_port=0,
                     shard_args=["--kv-cache-mb", "64", "--dtype", "float32"],
                     gateway_args=["--http-listen", f"127.0.0.1:{ports[4]}", "--api-keys-file", str(root / "keys"),
                                   "--max-request-bytes", str(MAX_REQUEST_BYTES)],
                     internal_token=INTERNAL_TOKEN)  # the gateways started beside it have the session's
    shard = plan.shards[0]
    shard.args[shard.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    with Mesh(plan, log_dir=root).start(timeout=120) as m:
        m.http = f"http://127.0.0.1:{ports[4]}"
        m.http_port = ports[4]
        yield m


class Gateway:
    """One more gateway process over the mesh's services, with flags of its own."""

    def __init__(self, mesh, root, name: str, *args: str, tokenizer: str | None = None):
        self.grpc_port, self.http_port = free_ports(2)
        self.http = f"http://127.0.0.1:{self.http_port}"
        p = mesh.plan
        with open(root / f"{name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.gateway", "--listen", f"127.0.0.1:{self.grpc_port}",
                 "--http-listen", f"127.0.0.1:{self.http_port}", "--api-keys-file", str(root / "keys"),
                 "--model-name", MODEL, "--tokenizer", tokenizer or p.tokenizer.listen, "--cache", p.cache.listen,
                 "--shards", ",".join(s.listen for s in p.shards), "--metrics-port", "0", *args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"127.0.0.1:{self.grpc_port}", 60, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def _post(base: str, path: str, body: dict, tenant: str = "tenant-a", timeout: float = 60) -> tuple[int, dict]:
    return _post_with_headers(base, path, body, tenant, timeout)[:2]


def _post_with_headers(base: str, path: str, body: dict, tenant: str = "tenant-a",
                       timeout: float = 60) -> tuple[int, dict, dict]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {KEYS[tenant]}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read()), {k.lower(): v for k, v in reply.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


# --- prefix-cache scopes ---


def _document() -> str:
    """A prompt of several KV blocks that no other test sends (a fresh tag each call)."""
    return (f"Confidential memo {uuid.uuid4().hex}: the merger with the harbour company closes on Friday; "
            "the price is forty-two million and the board has not been told yet. ") * 3


def _cached(base: str, prompt: str, tenant: str, max_tokens: int, **fields) -> int:
    """The prompt tokens a completion reports cached. Each call of a test asks a different max_tokens:
    never answered from the response cache, so only the prefix cache counts."""
    status, reply = _post(base, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, **fields}, tenant)
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] > 48  # several full blocks of 16
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_scopes_name_blocks_apart():
    tokens = list(range(64))
    default = chain_block_hashes(tokens, 16)
    assert chain_block_hashes(tokens, 16, root=scope_root(b"")) == default and scope_root() == ROOT
    scopes = [cache_scope("a"), cache_scope("b"), cache_scope("a", "s"), cache_scope("a", "t"), cache_scope("", "s"),
              cache_scope("a:1", ""), cache_scope("a", ":1")]
    assert cache_scope("a", shared=True) == b"" and cache_scope("a", "s", shared=True) == cache_scope("", "s")
    chains = {tuple(chain_block_hashes(tokens, 16, root=scope_root(s))) for s in scopes}
    assert len(chains) == len(scopes) and tuple(default) not in chains
    assert not set(default) & {h for chain in chains for h in chain}


def test_another_tenants_prompt_is_not_a_cache_hit(mesh):
    document = _document()
    assert _cached(mesh.http, document, "tenant-a", 2) == 0
    assert _cached(mesh.http, document, "tenant-b", 3) == 0  # B learns nothing of what A sent
    assert _cached(mesh.http, document, "tenant-a", 4) >= 48  # A's own blocks serve A
    assert _cached(mesh.http, document, "tenant-b", 5) >= 48  # and B's, B


def test_cache_salt_scopes_within_a_tenant(mesh):
    document = _document()
    assert _cached(mesh.http, document, "tenant-a", 2, cache_salt="user-1") == 0
    assert _cached(mesh.http, document, "tenant-a", 3) == 0  # unsalted: another scope
    assert _cached(mesh.http, document, "tenant-a", 4, cache_salt="user-2") == 0
    assert _cached(mesh.http, document, "tenant-a", 5, cache_salt="user-1") >= 48
    assert _cached(mesh.http, document, "tenant-b", 6, cache_salt="user-1") == 0  # a salt is no way into A's
    chat = {"messages": [{"role": "user", "content": document}]}
    status, reply = _post(mesh.http, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "cache_salt": "", **chat})
    assert status == 400 and reply["error"]["param"] == "cache_salt", reply


def test_cache_salt_separates_the_response_cache_too(mesh):
    body = {"model": MODEL, "prompt": _document(), "max_tokens": 3, "temperature": 0}
    first = _post(mesh.http, "/v1/completions", {**body, "cache_salt": "user-1"})[1]["usage"]
    other = _post(mesh.http, "/v1/completions", {**body, "cache_salt": "user-2"})[1]["usage"]
    again = _post(mesh.http, "/v1/completions", {**body, "cache_salt": "user-1"})[1]["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == other["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"]  # the response cache's hit


def test_shared_prefix_cache_shares_across_tenants_on_purpose(mesh, root):
    shared = Gateway(mesh, root, "gateway-shared", "--shared-prefix-cache")
    try:
        document = _document()
        assert _cached(shared.http, document, "tenant-a", 2) == 0
        assert _cached(shared.http, document, "tenant-b", 3) >= 48
        assert _cached(shared.http, document, "tenant-b", 4, cache_salt="mine") == 0  # a salt still scopes
        assert _cached(mesh.http, document, "tenant-b", 5) == 0  # the default gateway keeps B's scope its own
    finally:
        shared.stop()


# --- grammars past the grammar engine's limits ---


def _structured(structured: dict, max_tokens: int = 8) -> tuple[int, dict]:
    return _post(MESH[0].http, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Pick one."}], "max_tokens": max_tokens,
        "structured_outputs": structured}, timeout=120)


MESH: list = []  # the module's mesh, for the helpers above


@pytest.fixture
def http_mesh(mesh):
    MESH[:] = [mesh]
    return mesh


def _alternatives(n: int) -> list[str]:
    return [f"option number {i}" for i in range(n)]


@pytest.mark.parametrize("structured", [{"choice": _alternatives(20_000)},
                                        {"grammar": "start: " + " | ".join(f'"alt{i}"' for i in range(20_000))}],
                         ids=["choice", "lark"])
def test_a_grammar_past_the_engines_limits_is_the_clients_400(http_mesh, structured):
    status, reply = _structured(structured)
    assert status == 400, reply
    message = reply["error"]["message"]
    assert "max_items_in_row" in message and "max is 2000" in message, message
    assert "<state>" not in message  # the parser's state dump stays out of the answer


def _sweep() -> list[tuple[str, dict]]:
    """Grammars and schemas of growing size, the largest near the request's byte limit."""
    cases = []
    for n in (500, 2_500, 42_000):
        cases.append((f"choice-{n}", {"choice": _alternatives(n)}))
    for n in (2_500, 60_000):
        cases.append((f"lark-{n}", {"grammar": "start: " + " | ".join(f'"w{i}"' for i in range(n))}))
    cases.append(("regex-20000", {"regex": "(" + "|".join(f"r{i}" for i in range(20_000)) + ")"}))
    cases.append(("properties-4000", {"json": {"type": "object", "required": [f"p{i}" for i in range(4_000)],
                                               "properties": {f"p{i}": {"type": "integer"} for i in range(4_000)}}}))
    cases.append(("enum-30000", {"json": {"enum": [f"e{i}" for i in range(30_000)]}}))
    deep: dict = {"type": "integer"}
    for _ in range(600):
        deep = {"type": "array", "items": deep}
    cases.append(("nested-600", {"json": deep}))
    return cases


def test_a_sweep_of_grammar_sizes_finds_only_200_or_4xx(http_mesh):
    outcomes = {}
    for name, structured in _sweep():
        assert len(json.dumps(structured)) < MAX_REQUEST_BYTES - 1000, name  # within the request limit
        status, reply = _structured(structured, max_tokens=4)
        outcomes[name] = (status, reply.get("error", {}).get("message", "")[:160])
    bad = {name: outcome for name, outcome in outcomes.items() if not (outcome[0] == 200 or 400 <= outcome[0] < 500)}
    assert not bad, bad


# --- a chunked body, counted as it streams ---


def _chunked_post(port: int, path: str, pieces, tenant: str = "tenant-a") -> tuple[int, dict, dict]:
    """POST a body as Transfer-Encoding: chunked (no Content-Length), one chunk per piece; the answer
    is read once every piece went out, or as soon as the server answers early (and stops reading)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("POST", path)
        for name, value in (("content-type", "application/json"), ("transfer-encoding", "chunked"),
                            ("authorization", f"Bearer {KEYS[tenant]}")):
            connection.putheader(name, value)
        connection.endheaders()
        try:
            for piece in pieces:
                connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            connection.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest was sent
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read()), dict(reply.getheaders())
    finally:
        connection.close()


def test_a_chunked_body_is_read_and_refused_past_the_limit(mesh):
    body = json.dumps({"model": MODEL, "prompt": "Hello there", "max_tokens": 2}).encode()
    status, reply, _ = _chunked_post(mesh.http_port, "/v1/completions", [body[i:i + 7] for i in range(0, len(body), 7)])
    assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply
    # Past the limit in 64 KiB chunks: refused once the count passes it, the rest never sent.
    piece = b" " * (64 << 10)
    pieces = (piece for _ in range(MAX_REQUEST_BYTES // len(piece) + 1))
    status, reply, _ = _chunked_post(mesh.http_port, "/v1/completions", pieces)
    assert status == 413 and reply["error"]["code"] == "request_too_large", reply
    assert str(MAX_REQUEST_BYTES) in reply["error"]["message"]
    # The Anthropic path shapes the same refusal its own way.
    status, reply, _ = _chunked_post(mesh.http_port, "/v1/messages", (piece for _ in range(20)))
    assert status == 413 and reply["error"]["type"] == "request_too_large", reply


# --- no tokenizer serving: refused at once, served again at its return ---


def _tokenizer(root, name: str) -> tuple[str, subprocess.Popen]:
    listen = f"127.0.0.1:{free_ports(1)[0]}"
    with open(root / f"{name}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.tokenizer", "--listen", listen, "--metrics-port", "0",
                                 "--model", str(REAL_MODEL_DIR)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(listen, 60, proc)
    return listen, proc




def test_no_serving_tokenizer_fails_requests_at_once_until_one_answers(mesh, root):
    listen, tokenizer = _tokenizer(root, "tokenizer-stopped")
    # A tokenizer timeout far above the bound below: a request that waited on the stopped one shows.
    gateway = Gateway(mesh, root, "gateway-stopped-tokenizer", "--tokenizer-timeout", "20", tokenizer=listen)
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 2}
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}"))
    auth = (("authorization", f"Bearer {KEYS['tenant-a']}"),)
    request = gateway_pb2.GenerateRequest(prompt="Hello there", sampling=common_pb2.SamplingParams(max_tokens=2))
    try:
        assert _post(gateway.http, "/v1/completions", body)[0] == 200
        os.kill(tokenizer.pid, signal.SIGSTOP)  # hung: its connections stay open, nothing answers
        try:
            assert wait_for(lambda: not grpc_serving(f"127.0.0.1:{gateway.grpc_port}"), timeout=10)
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(request, metadata=auth, timeout=30)
                took = time.monotonic() - started
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "no tokenizer replica serves" in err.value.details() and took < 1.0, (took, err.value.details())
                assert retry_delay_s(err.value) == 0.5
                started = time.monotonic()
                status, reply, headers = _post_with_headers(gateway.http, "/v1/completions", body)
                took = time.monotonic() - started
                assert status == 503 and headers.get("retry-after") == "1" and took < 1.0, (status, reply, took)
        finally:
            os.kill(tokenizer.pid, signal.SIGCONT)
        assert wait_for(lambda: grpc_serving(f"127.0.0.1:{gateway.grpc_port}"), timeout=5)
        assert stub.Generate(request, metadata=auth, timeout=30).usage.completion_tokens == 2
    finally:
        gateway.stop()
        tokenizer.terminate()
        tokenizer.wait(30)
