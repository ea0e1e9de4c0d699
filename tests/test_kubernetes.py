"""Gateway discovery of shard replicas and the scaling CLI, against a Kubernetes API test double.

The API server is tests/kube_api_double.py (real list/watch JSON, real HTTP); the client is the
real `kubernetes` package; the gateway, tokenizer and shards are real processes on loopback.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services import kube_admin

from .conftest import free_ports, metric, wait_for
from .kube_api_double import KubeApiDouble

NAMESPACE, SERVICE = "serving", "llm-mesh-shard"


@pytest.fixture
def kube_api():
    double = KubeApiDouble().start()
    yield double
    double.stop()


def _requests_seen(mesh, index: int) -> float:
    """Requests a shard has scheduled, from its /metrics."""
    return metric(mesh.plan.shards[index].metrics_port, "llmmesh_queue_time_seconds_count")


def test_the_gateway_follows_ready_shard_endpoints_while_requests_flow(kube_api, real_model_dir,
                                                                        vocab_sized_tiny_model, tmp_path):
    from services.launcher import Mesh, plan_mesh

    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    ports = free_ports(10)
    plan = plan_mesh(str(real_model_dir), shards=2, gateway_port=ports[0], ports=ports[1:5],
                     metrics_ports=ports[5:9], gateway_metrics_port=ports[9],
                     shard_args=["--kv-cache-mb", "16", "--cache", ""],
                     gateway_args=["--discovery", "kubernetes", "--shard-service", SERVICE, "--namespace", NAMESPACE,
                                   "--kubeconfig", str(kubeconfig), "--no-response-cache"])
    for spec in plan.shards:  # the shards serve the tiny model; the tokenizer stays the real one
        spec.args[spec.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    shard_ports = [int(s.listen.rsplit(":", 1)[1]) for s in plan.shards]
    kube_api.set_endpoints(NAMESPACE, SERVICE, [("127.0.0.1", shard_ports[0], True)])

    with Mesh(plan, log_dir=tmp_path / "logs") as mesh:
        mesh.start(timeout=120)
        errors: list[Exception] = []
        served = [0]
        stop = threading.Event()

        def client():
            with grpc.insecure_channel(mesh.gateway_address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                i = 0
                while not stop.is_set():
                    request = gateway_pb2.GenerateRequest(prompt=f"request {i}",
                                                          sampling=common_pb2.SamplingParams(max_tokens=12))
                    i += 1
                    try:
                        assert len(list(stub.GenerateStream(request, timeout=30))) > 0
                        served[0] += 1
                    except (grpc.RpcError, AssertionError) as exc:
                        errors.append(exc)

        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            assert wait_for(lambda: served[0] >= 5, timeout=60)
            assert _requests_seen(mesh, 1) == 0  # not an endpoint yet

            kube_api.set_endpoints(NAMESPACE, SERVICE, [("127.0.0.1", p, True) for p in shard_ports])
            assert wait_for(lambda: _requests_seen(mesh, 1) >= 3, timeout=60)  # a new replica takes load

            kube_api.set_endpoints(NAMESPACE, SERVICE, [("127.0.0.1", shard_ports[0], False),
                                                        ("127.0.0.1", shard_ports[1], True)])

            def shard0_idle():  # unready: no new requests reach it while others are served
                before, served_before = _requests_seen(mesh, 0), served[0]
                wait_for(lambda: served[0] >= served_before + 6, timeout=30)
                return _requests_seen(mesh, 0) == before and served[0] >= served_before + 6

            assert wait_for(shard0_idle, timeout=60)

            kube_api.set_endpoints(NAMESPACE, SERVICE, [("127.0.0.1", shard_ports[0], True)])  # shard 1 gone
            before = _requests_seen(mesh, 0)
            assert wait_for(lambda: _requests_seen(mesh, 0) >= before + 6, timeout=60)
        finally:
            stop.set()
            for t in clients:
                t.join(60)
        assert errors == [], errors[:3]


def test_scale_patches_the_shard_statefulset_and_status_lists_endpoints(kube_api, tmp_path, capsys):
    kubeconfig = str(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    kube_api.set_statefulset(NAMESPACE, "prod-shard", 2)
    kube_api.set_endpoints(NAMESPACE, "prod-shard", [("10.0.0.5", 50061, True), ("10.0.0.6", 50061, False)],
                           pod_prefix="prod-shard")
    common = ["--kubeconfig", kubeconfig, "--namespace", NAMESPACE, "--release", "prod"]

    assert kube_admin.main([*common, "scale", "5"]) == 0
    assert kube_api.replicas(NAMESPACE, "prod-shard") == 5
    assert "replicas 2 -> 5" in capsys.readouterr().out
    assert kube_api.patches[-1]["body"] == {"spec": {"replicas": 5}}

    assert kube_admin.main([*common, "status", "--metrics-port", "0"]) == 0
    out = capsys.readouterr().out
    assert "desired 5" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("prod-shard-")]
    assert [(l[0], l[1], l[2]) for l in lines] == [("prod-shard-0", "10.0.0.5:50061", "true"),
                                                   ("prod-shard-1", "10.0.0.6:50061", "false")]

    assert kube_admin.main([*common, "scale", "-1"]) == 2
    assert kube_admin.main(["--kubeconfig", kubeconfig, "--namespace", NAMESPACE, "--release", "nope", "scale", "1"]) == 1
    assert "404" in capsys.readouterr().err
