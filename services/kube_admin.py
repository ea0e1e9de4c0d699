"""Operate the model shards of a release on Kubernetes.

    python -m services.kube_admin status [--namespace NS] [--release NAME]
    python -m services.kube_admin scale 4 [--namespace NS] [--release NAME]

`scale` patches the shard StatefulSet's scale subresource (what `kubectl scale` does; an HPA or
GitOps tool that owns the count will set it back). `status` lists the StatefulSet's counts and
every shard endpoint with its readiness and, where its metrics port answers (in-cluster), its load.
Credentials: --kubeconfig, else $KUBECONFIG, else ~/.kube/config, else the pod's service account.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from dataclasses import dataclass

from services.gateway.discovery import SERVICE_NAME_LABEL, slice_endpoints


@dataclass
class ShardEndpoint:
    pod: str
    address: str
    ready: bool
    running: float | None = None  # requests in the batch, from /metrics; None when unreachable
    waiting: float | None = None


def api_client(kubeconfig: str | None):
    from kubernetes import client, config

    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if os.path.exists(path):
        return config.new_client_from_config(config_file=path)
    config.load_incluster_config()
    return client.ApiClient()


def scale(api, namespace: str, statefulset: str, replicas: int) -> tuple[int, int]:
    """Set the replica count; returns (before, after) as the API server reports them."""
    from kubernetes import client

    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    apps = client.AppsV1Api(api)
    before = apps.read_namespaced_stateful_set_scale(statefulset, namespace).spec.replicas
    after = apps.patch_namespaced_stateful_set_scale(statefulset, namespace, {"spec": {"replicas": replicas}})
    return before, after.spec.replicas


def shard_endpoints(api, namespace: str, service: str, metrics_port: int | None, timeout_s: float = 1.0) -> list[ShardEndpoint]:
    from kubernetes import client

    slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        namespace, label_selector=f"{SERVICE_NAME_LABEL}={service}")
    out = []
    for pod, address, ready in slice_endpoints(slices.items, "grpc"):
        endpoint = ShardEndpoint(pod, address, ready)
        if metrics_port:
            endpoint.running, endpoint.waiting = _load(address.rsplit(":", 1)[0], metrics_port, timeout_s)
        out.append(endpoint)
    return sorted(out, key=lambda e: e.pod)


def _load(host: str, port: int, timeout_s: float) -> tuple[float | None, float | None]:
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s).read().decode()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("llmmesh_requests_running", "llmmesh_requests_waiting"):
            values[name] = float(value)
    return values.get("llmmesh_requests_running"), values.get("llmmesh_requests_waiting")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kube_admin", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default=os.environ.get("LLMMESH_NAMESPACE", "default"))
    parser.add_argument("--release", default="llm-mesh", help="the Helm release (names its shard StatefulSet and Service)")
    parser.add_argument("--kubeconfig")
    sub = parser.add_subparsers(dest="command", required=True)
    p_scale = sub.add_parser("scale", help="set the number of shard replicas")
    p_scale.add_argument("replicas", type=int)
    p_status = sub.add_parser("status", help="shard replicas, readiness and load")
    p_status.add_argument("--metrics-port", type=int, default=9410, help="0: do not ask the pods for their load")
    args = parser.parse_args(argv)
    from kubernetes.client.rest import ApiException

    api = api_client(args.kubeconfig)
    name = f"{args.release}-shard"
    try:
        if args.command == "scale":
            before, after = scale(api, args.namespace, name, args.replicas)
            print(f"statefulset/{name}: replicas {before} -> {after}")
            return 0
        from kubernetes import client

        sts = client.AppsV1Api(api).read_namespaced_stateful_set(name, args.namespace)
        print(f"statefulset/{name}: desired {sts.spec.replicas}, ready {sts.status.ready_replicas or 0}")
        print(f"{'POD':28} {'ADDRESS':24} {'READY':6} {'RUNNING':>8} {'WAITING':>8}")
        for e in shard_endpoints(api, args.namespace, name, args.metrics_port):
            fmt = (lambda v: "-" if v is None else f"{v:.0f}")
            print(f"{e.pod:28} {e.address:24} {str(e.ready).lower():6} {fmt(e.running):>8} {fmt(e.waiting):>8}")
        return 0
    except ApiException as exc:
        print(f"error: the API server answered {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
