"""A shard whose Ray workers span two hosts: `ray start --head` on one host, `ray start --address` on
another and on the shard's own host, and a shard there that joins the cluster through RAY_ADDRESS and
places its tensor-parallel workers one per node (STRICT_SPREAD). Hosts are network namespaces
(tests/cluster.py); gloo binds the interface of each worker's Ray node address.

The greedy tokens across hosts are those of the local executor, also after a worker host crashed and
came back.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.launcher import wait_healthy
from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.request import SamplingParams

from .cluster import PORT, RAY_ENV, Cluster, cluster_unavailable, join_ray, start_ray
from .conftest import internal_channel, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(cluster_unavailable()), reason=str(cluster_unavailable()))]
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


@pytest.fixture(scope="module")
def ray_cluster_shard(vocab_sized_tiny_model, tmp_path_factory):
    with Cluster(["rayhead", "raynode", "shard"], tmp_path_factory.mktemp("ray-cluster"), subnet=1) as c:
        # The shard's own node offers no slots: its two workers go to the other two hosts.
        head = start_ray(c, "rayhead", {"rayhead": 1, "raynode": 1, "shard": 0})
        address = c["shard"].address(PORT)
        shard = c.start("shard", ["python", "-m", "services.model_shard", "--listen", address, "--model",
                                  str(vocab_sized_tiny_model), "--dtype", "float32", "--quantization", "none",
                                  "--kv-cache-mb", "16", "--block-size", "4", "--tensor-parallel-size", "2",
                                  "--placement-strategy", "STRICT_SPREAD", "--placement-timeout", "3"],
                        {**RAY_ENV, "RAY_ADDRESS": head})
        wait_healthy(address, 240, shard)
        yield c, shard_pb2_grpc.ModelShardStub(internal_channel(address))


def test_a_shard_split_over_two_ray_hosts_gives_the_local_executors_tokens(ray_cluster_shard, vocab_sized_tiny_model):
    cluster, stub = ray_cluster_shard
    info = stub.Info(shard_pb2.ShardInfoRequest(), timeout=30)
    assert info.tensor_parallel_size == 2
    assert sorted(w.node for w in info.workers) == sorted([cluster["rayhead"].ip, cluster["raynode"].ip])
    request = shard_pb2.ShardGenerateRequest(request_id="across", prompt_token_ids=PROMPT,
                                             sampling=common_pb2.SamplingParams(max_tokens=24))
    across = [t for reply in stub.Generate(request, timeout=120) for t in reply.token_ids]
    local = LLMEngine.from_dir(vocab_sized_tiny_model, EngineConfig(block_size=4, kv_cache_bytes=4 << 20))
    assert across == local.generate([PROMPT], SamplingParams(max_tokens=24))[0]


def _refusal(stub) -> str:
    """The details of the shard's refusal of a request now ("" if it served it)."""
    try:
        list(stub.Generate(shard_pb2.ShardGenerateRequest(request_id="probe", prompt_token_ids=PROMPT), timeout=30))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return err.details()
    return ""


def test_a_crashed_worker_host_fails_its_streams_fast_and_the_shard_rebuilds_when_it_returns(
        ray_cluster_shard, vocab_sized_tiny_model):
    cluster, stub = ray_cluster_shard
    channel = grpc.insecure_channel(cluster["shard"].address(PORT))
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=300)
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
    # A gateway routes around it: the shard says NOT_SERVING while it cannot place its workers again,
    # and refuses what is sent to it anyway, at once, saying why.
    assert next(r for r in watch if r.status != health_pb2.HealthCheckResponse.SERVING).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    refused_at = time.monotonic()
    assert any(reason in _refusal(stub) for reason in ("died", "cannot place"))
    assert time.monotonic() - refused_at < 5
    # Each try to place the workers again gives up after --placement-timeout (3 s) and the next
    # begins; the refusals say why.
    assert wait_for(lambda: "cannot place" in _refusal(stub), timeout=60)
    # The host returns: the pending placement is met, the workers are built again, and it serves.
    join_ray(cluster, "raynode", cluster["rayhead"].address(6379), 1, alive=3, head="rayhead")
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    after = shard_pb2.ShardGenerateRequest(request_id="after", prompt_token_ids=PROMPT,
                                           sampling=common_pb2.SamplingParams(max_tokens=24))
    local = LLMEngine.from_dir(vocab_sized_tiny_model, EngineConfig(block_size=4, kv_cache_bytes=4 << 20))
    assert [t for r in stub.Generate(after, timeout=120) for t in r.token_ids] == \
        local.generate([PROMPT], SamplingParams(max_tokens=24))[0]
    info = stub.Info(shard_pb2.ShardInfoRequest(), timeout=30)
    assert sorted(w.node for w in info.workers) == sorted([cluster["rayhead"].ip, cluster["raynode"].ip])
