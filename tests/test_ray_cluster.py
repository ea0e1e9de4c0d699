"""A shard whose Ray workers span two hosts: `ray start --head` on one host, `ray start --address` on
another and on the shard's own host, and a shard there that joins the cluster through RAY_ADDRESS and
places its tensor-parallel workers one per node (STRICT_SPREAD). Hosts are network namespaces
(tests/cluster.py); gloo binds the interface of each worker's Ray node address.

The greedy tokens across hosts are those of the local executor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.launcher import wait_healthy
from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams

from .cluster import Cluster, cluster_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(cluster_unavailable()), reason=str(cluster_unavailable()))]
RAY = str(Path(sys.executable).with_name("ray"))
# `ray start --head` turns token authentication on by default; these hosts are a test's namespaces, so
# the cluster runs without it (a deployment shares the token with every node and driver instead).
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def _alive_nodes(cluster: Cluster, host: str, head: str) -> int:
    """Ray nodes alive, as a driver on `host` sees them (0 while it cannot connect)."""
    code = (f"import ray; ray.init(address={head!r}, _node_ip_address={cluster[host].ip!r}); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    seen = subprocess.run(["ip", "netns", "exec", cluster[host].netns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **RAY_ENV})
    return int(seen.stdout.strip() or 0) if seen.returncode == 0 else 0


@pytest.fixture(scope="module")
def ray_cluster_shard(vocab_sized_tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-cluster")
    temp_dirs = []
    with Cluster(["rayhead", "raynode", "shard"], logs, subnet=1) as c:
        head = c["rayhead"].address(6379)
        for host, cpus in (("rayhead", 1), ("raynode", 1), ("shard", 0)):
            temp = Path(f"/tmp/lmray-{c.bridge}-{host}")  # short: Ray's socket paths live under it
            temp_dirs.append(temp)
            role = ["--head", "--port", "6379", "--include-dashboard=false"] if host == "rayhead" else ["--address", head]
            c.start(host, [RAY, "start", *role, "--node-ip-address", c[host].ip, "--num-cpus", str(cpus),
                           "--temp-dir", str(temp), "--disable-usage-stats", "--block"], RAY_ENV)
            if host == "rayhead":
                deadline = time.monotonic() + 90
                while _alive_nodes(c, "rayhead", head) < 1:
                    assert time.monotonic() < deadline, "the Ray head did not start within 90 s"
        deadline = time.monotonic() + 120
        while _alive_nodes(c, "shard", head) < 3:
            assert time.monotonic() < deadline, "the Ray cluster did not reach 3 nodes within 120 s"
        address = c["shard"].address(50051)
        shard = c.start("shard", ["python", "-m", "services.model_shard", "--listen", address, "--model",
                                  str(vocab_sized_tiny_model), "--dtype", "float32", "--quantization", "none",
                                  "--kv-cache-mb", "16", "--block-size", "4", "--tensor-parallel-size", "2",
                                  "--placement-strategy", "STRICT_SPREAD"], {**RAY_ENV, "RAY_ADDRESS": head})
        try:
            wait_healthy(address, 240, shard)
            yield c, shard_pb2_grpc.ModelShardStub(grpc.insecure_channel(address))
        finally:
            c.close()
            for temp in temp_dirs:
                shutil.rmtree(temp, ignore_errors=True)


def test_a_shard_split_over_two_ray_hosts_gives_the_local_executors_tokens(ray_cluster_shard, vocab_sized_tiny_model):
    cluster, stub = ray_cluster_shard
    info = stub.Info(shard_pb2.ShardInfoRequest(), timeout=30)
    assert info.tensor_parallel_size == 2
    assert sorted(w.node for w in info.workers) == sorted([cluster["rayhead"].ip, cluster["raynode"].ip])
    request = shard_pb2.ShardGenerateRequest(request_id="across", prompt_token_ids=PROMPT,
                                             sampling=common_pb2.SamplingParams(max_tokens=24))
    across = [t for reply in stub.Generate(request, timeout=120) for t in reply.token_ids]
    local = LLMEngine.from_dir(vocab_sized_tiny_model, EngineConfig(block_size=4, kv_cache_bytes=4 << 20))
    want = local.generate([PROMPT], SamplingParams(max_tokens=24))[0]
    assert across == want


def test_a_crashed_worker_host_fails_its_streams_fast_and_the_shard_stops_serving(ray_cluster_shard):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cluster, stub = ray_cluster_shard
    channel = grpc.insecure_channel(cluster["shard"].address(50051))
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    request = shard_pb2.ShardGenerateRequest(request_id="crash", prompt_token_ids=PROMPT,
                                             sampling=common_pb2.SamplingParams(max_tokens=3000))
    stream = stub.Generate(request, timeout=120)
    next(stream)
    start = time.monotonic()
    cluster.crash("raynode")  # rank 1's host
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "died" in err.value.details()
    assert time.monotonic() - start < 30  # Ray's own failure detection, not the request's deadline
    # A gateway routes around it: the shard says NOT_SERVING while it cannot place its workers again.
    assert any(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING for reply in watch)
