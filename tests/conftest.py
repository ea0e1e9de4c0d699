"""Shared fixtures: a tiny seeded Llama (fast, deterministic) and the real converted model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
REAL_MODEL_DIR = Path(os.environ.get("LLMMESH_MODEL_DIR", ROOT / "models" / "SmolLM2-135M-Instruct"))


def _session_token() -> str:
    """The internal token of every service the tests start by hand (they inherit the environment), and
    of the session's mesh, so that a gateway started beside it reaches its backends."""
    from services.common.internal_auth import TOKEN_ENV, new_token

    return os.environ.setdefault(TOKEN_ENV, new_token())


INTERNAL_TOKEN = _session_token()


def internal_channel(address: str):
    """A blocking channel that sends the session's internal token (to call a shard, tokenizer or cache)."""
    from services.launcher import client_channel

    return client_channel(address, token=INTERNAL_TOKEN)


def internal_aio_channel(address: str):
    import grpc

    from services.common.internal_auth import send_token_interceptors

    return grpc.aio.insecure_channel(address, interceptors=send_token_interceptors(INTERNAL_TOKEN))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama saved like a real checkpoint (heads divide 2 and 4 for later TP tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vocab_sized_tiny_model(tmp_path_factory, real_model_dir):
    """A tiny random Llama with the real tokenizer's vocabulary: shards that start at once and
    serve real token ids, for tests of the mesh's plumbing rather than the model's answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    out = tmp_path_factory.mktemp("tiny-vocab-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    shutil.copy(real_model_dir / "tokenizer.json", out)  # its grammars (structured output) need the tokenizer
    return out


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    if not (REAL_MODEL_DIR / "config.json").exists():
        pytest.fail(f"the real model is missing at {REAL_MODEL_DIR}: run `make model`")
    return REAL_MODEL_DIR


def wait_for(condition, timeout: float = 20.0, interval: float = 0.1):
    """Poll a condition on state other processes change (span files, logs, metrics), bounded.
    Returns the condition's last result: truthy once it held, falsy if the time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """Every sample a process's /metrics shows, by (sample name, sorted labels)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample_value(samples: dict[tuple[str, tuple], float], name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric(port: int, name: str, host: str = "127.0.0.1", **labels) -> float:
    """One sample of a process's /metrics (0 when absent), e.g. metric(p, "llmmesh_step_tokens_sum")."""
    return sample_value(scrape_metrics(port, host), name, **labels)


@contextlib.contextmanager
def shard_process(model_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 120.0):
    """A model shard as its own process on a free loopback port, healthy on entry, drained on exit.
    Yields (address, process)."""
    import subprocess
    import sys

    from services.launcher import free_port, wait_healthy

    listen = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.model_shard", "--model", str(model_dir),
                                 "--listen", listen, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(listen, timeout, proc)
            yield listen, proc
        finally:
            proc.terminate()
            proc.wait(60)


def grpc_serving(address: str) -> bool:
    """Whether the gRPC server at address says SERVING to a health check (False when it cannot answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def free_ports(n: int) -> list[int]:
    from services.launcher import free_port

    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return list(ports)


def pytest_collection_finish(session):
    """Start the session's local Ray cluster now when a test will use it, before other tests leave
    threads (gRPC's, event loops') in this process. Ray starts its processes with a preexec_fn,
    Python run in the forked child, which can hang on a lock another thread held at the fork: a GCS
    that never writes its port."""
    if any("ray_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        from services.model_shard.executor.ray_workers import connect_ray

        connect_ray()


@pytest.fixture(scope="session")
def ray_cluster():
    """Tests that build parallel engines in this process share one local Ray cluster, started from
    the main thread before the first test (pytest_collection_finish, connect_ray) and stopped at
    the end of the session."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the module's own, in a temporary directory (tests/postgres.py)."""
    from .postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def otlp_receiver():
    from .otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def mesh(real_model_dir, tmp_path_factory, otlp_receiver):
    """The whole mesh as processes on loopback: tokenizer, cache, two shard replicas, gateway."""
    from services.launcher import Mesh, plan_mesh

    shards = 2
    ports = free_ports(2 * (2 + shards) + 2)
    plan = plan_mesh(str(real_model_dir), shards=shards, gateway_port=ports[0], ports=ports[1:5],
                     metrics_ports=ports[5:9], gateway_metrics_port=ports[9], shard_args=["--kv-cache-mb", "256"],
                     internal_token=INTERNAL_TOKEN)
    root = tmp_path_factory.mktemp("mesh")
    trace_dir = root / "traces"
    env = {
        "LLMMESH_TRACE_DIR": str(trace_dir),
        "LLMMESH_LOG_FORMAT": "json",
        # The standard OTel variables, as a deployment would set them: export to the test's receiver.
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with Mesh(plan, env=env, log_dir=root / "logs") as m:
        m.start(timeout=240)
        m.trace_dir = trace_dir
        m.log_dir = root / "logs"
        yield m


@pytest.fixture(scope="session")
def gateway(mesh):
    import grpc

    from llmmesh.v1 import gateway_pb2_grpc

    with grpc.insecure_channel(mesh.gateway_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def hf_reference(model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def streams_through(stub, requests: list, fault) -> list[list]:
    """Every request's GenerateStream, each running (its first message read) when fault() is called;
    returns each stream's messages, to the end."""
    started = threading.Barrier(len(requests) + 1)

    def run(request):
        stream = stub.GenerateStream(request, timeout=120)
        chunks = [next(stream)]
        started.wait(timeout=60)
        chunks.extend(stream)
        return chunks

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(run, r) for r in requests]
        started.wait(timeout=60)
        fault()
        return [f.result(timeout=120) for f in futures]


def gateway_resumed(log_path: Path) -> bool:
    """Whether the gateway's JSON log says it resumed a stream on another replica."""
    from services.trace_view import complete_lines

    return any("resuming elsewhere" in json.loads(line)["message"]
               for line in complete_lines(log_path) if line.startswith("{"))


async def with_tokenizer_service(tokenizer, scenario):
    """scenario(tokenizer, stub) against a real tokenizer service on loopback, in this process."""
    import grpc

    from llmmesh.v1 import tokenizer_pb2_grpc
    from services.tokenizer.server import TokenizerServicer

    server = grpc.aio.server()
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tokenizer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await scenario(tokenizer, tokenizer_pb2_grpc.TokenizerStub(channel))
    finally:
        await server.stop(0)
