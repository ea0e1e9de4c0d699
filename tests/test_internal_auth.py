"""Internal calls carry the mesh's credential. The tokenizer, cache and shards, started by hand or by the
launcher, answer a caller without the internal token UNAUTHENTICATED before reading its request; health
checks stay open; with the token every call works; --insecure-internal serves anyone, and says so."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import (cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, shard_pb2,
                        shard_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc)
from services.common.internal_auth import TOKEN_ENV, TOKEN_FILE_ENV, write_token_file
from services.launcher import Mesh, client_channel, plan_mesh, wait_healthy
from services.launcher import main as launcher_main

from .conftest import INTERNAL_TOKEN, ROOT, free_ports, internal_channel

pytestmark = pytest.mark.e2e

# One call of each kind per service, as raw bytes: unary, server streaming, client streaming, bidi.
CALLS = {
    "tokenizer": [("/llmmesh.v1.Tokenizer/Encode", "unary_unary", tokenizer_pb2.EncodeRequest(prompt="hi")),
                  ("/llmmesh.v1.Tokenizer/DetokenizeStream", "stream_stream", tokenizer_pb2.DetokenizeRequest())],
    "cache": [("/llmmesh.v1.Cache/Stats", "unary_unary", cache_pb2.CacheStatsRequest()),
              ("/llmmesh.v1.Cache/GetKvBlocks", "unary_stream", cache_pb2.GetKvBlocksRequest(layout="x")),
              ("/llmmesh.v1.Cache/PutKvBlocks", "stream_unary", cache_pb2.KvBlockChunk())],
    "shard": [("/llmmesh.v1.ModelShard/Info", "unary_unary", shard_pb2.ShardInfoRequest()),
              ("/llmmesh.v1.ModelShard/Generate", "unary_stream",
               shard_pb2.ShardGenerateRequest(prompt_token_ids=[5, 6, 7],
                                              sampling=common_pb2.SamplingParams(max_tokens=4))),
              ("/llmmesh.v1.ModelShard/GenerateBatch", "stream_stream", shard_pb2.BatchRequest())],
}
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _call(channel: grpc.Channel, method: str, kind: str, payload: bytes):
    """Make the call and read all of its answer."""
    call = getattr(channel, kind)(method)
    if kind == "unary_unary":
        return call(payload, timeout=30)
    if kind == "unary_stream":
        return list(call(payload, timeout=30))
    if kind == "stream_unary":
        return call(iter([payload]), timeout=30)
    return list(call(iter([payload]), timeout=30))


def _refusal(channel: grpc.Channel, method: str, kind: str, payload: bytes) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, method, kind, payload)
    return err.value.code()


@contextlib.contextmanager
def _process(argv: list[str], log: Path, env: dict[str, str]):
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def _without_credential() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV, "LLMMESH_INSECURE_INTERNAL")}


def _tiny_mesh(real_model_dir, vocab_sized_tiny_model, root: Path, **options) -> Mesh:
    ports = free_ports(4)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:], metrics_ports=[0, 0, 0],
                     gateway_metrics_port=0, shard_args=["--kv-cache-mb", "16", "--dtype", "float32"], **options)
    plan.shards[0].args[plan.shards[0].args.index("--model") + 1] = str(vocab_sized_tiny_model)
    return Mesh(plan, log_dir=root)


@pytest.fixture(scope="module")
def mesh(real_model_dir, vocab_sized_tiny_model, tmp_path_factory):
    """A mesh under the launcher, with a token of its own (in this module, in place of the session's)."""
    with _tiny_mesh(real_model_dir, vocab_sized_tiny_model, tmp_path_factory.mktemp("mesh")).start(timeout=120) as m:
        yield m


@pytest.fixture(scope="module")
def cache_by_hand(tmp_path_factory):
    """A cache started by hand, its token in a 0600 file and none in its environment."""
    root = tmp_path_factory.mktemp("cache-by-hand")
    token_file = write_token_file(root / "token", INTERNAL_TOKEN)
    address = f"127.0.0.1:{free_ports(1)[0]}"
    with _process(["services.cache", "--listen", address, "--internal-token-file", str(token_file)],
                  root / "cache.log", _without_credential()) as proc:
        wait_healthy(address, 60, proc)  # health answers without the token
        yield address


def _backend(mesh, cache_by_hand, service: str) -> tuple[str, str | None]:
    """The address of a mesh backend (or of the cache started by hand) and its token."""
    if service == "cache-by-hand":
        return cache_by_hand, INTERNAL_TOKEN
    spec = mesh.plan.shards[0] if service == "shard" else getattr(mesh.plan, service)
    return spec.listen, mesh.plan.internal_token


@pytest.mark.parametrize("service", ["tokenizer", "cache", "shard", "cache-by-hand"])
def test_a_caller_without_the_token_is_unauthenticated_before_decoding(mesh, cache_by_hand, service):
    address, _ = _backend(mesh, cache_by_hand, service)
    with grpc.insecure_channel(address) as channel, client_channel(address, token="not-the-token") as wrong:
        for method, kind, request in CALLS[service.removesuffix("-by-hand")]:
            for payload in (request.SerializeToString(), b"\xff\xff\xff\xff"):  # garbage too: nothing is decoded
                assert _refusal(channel, method, kind, payload) == grpc.StatusCode.UNAUTHENTICATED, method
                assert _refusal(wrong, method, kind, payload) == grpc.StatusCode.UNAUTHENTICATED, method
        # Nor does it learn what the service offers: reflection, and methods that do not exist.
        assert _refusal(channel, REFLECTION, "stream_stream", b"") == grpc.StatusCode.UNAUTHENTICATED
        assert _refusal(channel, "/llmmesh.v1.Nothing/Here", "unary_unary", b"") == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open


def test_with_the_token_every_service_serves(mesh, cache_by_hand):
    with mesh.channel(mesh.plan.tokenizer.listen) as channel:
        assert tokenizer_pb2_grpc.TokenizerStub(channel).Encode(tokenizer_pb2.EncodeRequest(prompt="hi"),
                                                                timeout=30).token_ids
    for address, token in (_backend(mesh, cache_by_hand, "cache"), _backend(mesh, cache_by_hand, "cache-by-hand")):
        with client_channel(address, token=token) as channel:
            assert cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.CacheStatsRequest(), timeout=30).kv_budget_bytes
    with mesh.channel(mesh.plan.shards[0].listen) as channel:
        stub = shard_pb2_grpc.ModelShardStub(channel)
        _, _, request = CALLS["shard"][1]
        assert sum(len(m.token_ids) for m in stub.Generate(request, timeout=60)) == 4
        batch = [shard_pb2.BatchRequest(start=shard_pb2.BatchStart(stream_id=1, request=request))]
        assert sum(len(i.response.token_ids) for r in stub.GenerateBatch(iter(batch), timeout=60) for i in r.items) == 4


def test_the_mesh_under_the_launcher_serves_with_a_token_only_it_holds(mesh):
    token = mesh.plan.internal_token
    assert token != INTERNAL_TOKEN  # its own, not the one this test session runs with
    assert _generates(mesh) == 3  # the gateway called the tokenizer, cache and shard with it
    for name, proc in mesh.processes.items():  # in the environment only this user reads, not the command line
        proc_dir = Path(f"/proc/{proc.pid}")
        assert token.encode() not in (proc_dir / "cmdline").read_bytes(), name
        assert f"{TOKEN_ENV}={token}".encode() in (proc_dir / "environ").read_bytes().split(b"\0"), name
        assert stat.S_IMODE((proc_dir / "environ").stat().st_mode) & 0o077 == 0


def test_a_service_started_without_a_credential_refuses_to_start(tmp_path):
    loose = tmp_path / "token"
    loose.write_text("a-token\n")
    loose.chmod(0o644)
    port, = free_ports(1)
    runs = {module: subprocess.Popen([sys.executable, "-m", module, "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                                     env=_without_credential(), stderr=subprocess.PIPE, text=True)
            for module in ("services.cache", "services.tokenizer", "services.model_shard", "services.gateway")}
    runs["loose file"] = subprocess.Popen([sys.executable, "-m", "services.cache", "--listen", f"127.0.0.1:{port}",
                                           "--internal-token-file", str(loose)], cwd=ROOT, env=_without_credential(),
                                          stderr=subprocess.PIPE, text=True)
    for name, proc in runs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert "Traceback" not in stderr
        if name == "loose file":
            assert "is open to other users (mode 644): chmod 600 it" in stderr
        else:
            assert f"internal calls need a credential: set {TOKEN_ENV}" in stderr and "--insecure-internal" in stderr


def test_the_launcher_plans_one_credential_per_mesh(tmp_path):
    first, second = plan_mesh("m"), plan_mesh("m")
    assert first.internal_token and second.internal_token and first.internal_token != second.internal_token
    assert all(first.internal_token not in " ".join(s.argv()) for s in [first.gateway, *first.backends])
    tls = plan_mesh("m", tls_dir=tmp_path)  # mutual TLS: the client certificate is the credential
    assert tls.internal_token is None and all("--tls-client-auth" in s.args for s in tls.backends)
    insecure = plan_mesh("m", insecure_internal=True)
    assert insecure.internal_token is None
    assert all("--insecure-internal" in s.args for s in [insecure.gateway, *insecure.backends])


def test_the_launcher_refuses_a_token_it_would_not_use(real_model_dir, tmp_path, capsys):
    token_file = write_token_file(tmp_path / "token", "a-token")
    loose = tmp_path / "loose"
    loose.write_text("a-token")
    loose.chmod(0o640 | 0o004)
    for argv, message in ([["--internal-token-file", str(token_file), "--tls-dir", str(tmp_path)], "--tls-dir"],
                          [["--internal-token-file", str(token_file), "--insecure-internal"], "--insecure-internal"],
                          [["--internal-token-file", str(loose)], "chmod 600"]):
        with pytest.raises(SystemExit) as exit_:
            launcher_main(["--model", str(real_model_dir), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def _generates(mesh: Mesh) -> int:
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=60)
    return reply.usage.completion_tokens


def test_insecure_internal_serves_any_caller_and_warns(real_model_dir, vocab_sized_tiny_model, tmp_path):
    with _tiny_mesh(real_model_dir, vocab_sized_tiny_model, tmp_path, insecure_internal=True).start(timeout=120) as mesh:
        assert _generates(mesh) == 3
        for spec in mesh.plan.backends:
            kind = "shard" if spec.name.startswith("shard") else spec.name
            method, call_kind, request = CALLS[kind][0]
            with grpc.insecure_channel(spec.listen) as channel:  # no token, and served
                _call(channel, method, call_kind, request.SerializeToString())
        for spec in [mesh.plan.gateway, *mesh.plan.backends]:
            assert "internal calls are not authenticated (--insecure-internal)" in mesh.log_tail(spec.name, 200), \
                spec.name
