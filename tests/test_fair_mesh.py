"""Two tenants through real processes and the real model: one floods the mesh, the other's answers
are exactly what it gets alone, and every flooded request completes (tenant policies, fairness.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.auth import hash_key
from services.launcher import Mesh, plan_mesh

from .conftest import free_ports, metric

pytestmark = pytest.mark.e2e

FLOOD = 48


@pytest.fixture(scope="module")
def two_tenants(real_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    keys = root / "keys"
    keys.write_text(f"flood {hash_key('key-a')} priority=standard max_concurrent=32 max_queued=64\n"
                    f"steady {hash_key('key-b')} priority=interactive weight=2\n")
    ports = free_ports(6)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, ports[4]], gateway_metrics_port=ports[5],
                     shard_args=["--kv-cache-mb", "256", "--max-running", "24"],
                     gateway_args=["--no-response-cache", "--api-keys-file", str(keys)])
    with Mesh(plan, log_dir=root).start(timeout=180) as mesh:
        channel = grpc.insecure_channel(mesh.gateway_address)
        yield mesh, gateway_pb2_grpc.GatewayStub(channel)
        channel.close()


def _ask(stub, key: str, prompt: str, max_tokens: int, ignore_eos: bool = False, **request) -> list[int]:
    chunks = stub.GenerateStream(gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=ignore_eos), **request), timeout=300,
        metadata=[("authorization", f"Bearer {key}")])
    return [t for c in chunks for t in c.token_ids]


def test_a_flood_leaves_the_other_tenants_answers_as_they_are_alone(two_tenants):
    mesh, stub = two_tenants
    questions = [f"Question {i}: name a river in Europe and say where it flows." for i in range(3)]
    alone = [_ask(stub, "key-b", q, 24) for q in questions]

    def flood(i: int) -> list[int]:
        return _ask(stub, "key-a", f"Story {i}: a dragon who collects teapots, in one paragraph.", 24, ignore_eos=True)

    with ThreadPoolExecutor(FLOOD) as pool:
        flooded = [pool.submit(flood, i) for i in range(FLOOD)]
        during = [_ask(stub, "key-b", q, 24) for q in questions]  # one at a time, while A floods
        results = [f.result(timeout=300) for f in flooded]
    assert during == alone
    assert all(len(tokens) == 24 for tokens in results)  # nothing of the flood was lost
    # The flood's 48 requests went through the tenant's line at the gateway (32 at a time).
    gateway = mesh.plan.gateway.metrics_port
    assert metric(gateway, "llmmesh_tenant_gateway_queue_seconds_count", tenant="flood") == FLOOD
    assert metric(gateway, "llmmesh_tenant_gateway_queue_seconds_sum", tenant="flood") > 0
    shard = mesh.plan.shards[0].metrics_port
    assert metric(shard, "llmmesh_tenant_computed_tokens_total", tenant="steady") >= 3 * 24 * 2
    assert metric(shard, "llmmesh_tenant_computed_tokens_total", tenant="flood") >= FLOOD * 24


@pytest.mark.parametrize("key,priority,fragment", [
    ("key-a", 0, "above the ceiling of tenant 'flood', 1 (standard)"),
    ("key-b", 7, "priority 7 is not a class"),
])
def test_a_class_above_the_ceiling_or_unknown_is_invalid_argument(two_tenants, key, priority, fragment):
    _, stub = two_tenants
    with pytest.raises(grpc.RpcError) as err:
        _ask(stub, key, "hello", 2, priority=priority)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
    assert len(_ask(stub, "key-a", "hello", 2, priority=2)) == 2  # lower than its own class: served
