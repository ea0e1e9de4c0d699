"""Shard replicas from Kubernetes: the ready endpoints of the shards' headless Service, kept live.

gRPC holds one long-lived HTTP/2 connection per replica, so kube-proxy's per-connection balancing
would pin all requests on whichever pods the gateway first reached. The gateway instead watches
the Service's EndpointSlices (list, then watch from that resourceVersion; re-list when the watch
expires) and balances over the ready pods itself. A pod that turns unready (draining, failing its
probe) leaves the pool at once; its open streams finish on their channel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def slice_endpoints(slices: Iterable, port_name: str | None) -> Iterator[tuple[str, str, bool]]:
    """(pod, HOST:PORT, ready) of every endpoint address in the slices (kubernetes client objects)."""
    for s in slices:
        ports = [p for p in (s.ports or []) if port_name is None or p.name == port_name]
        if not ports or ports[0].port is None:
            continue
        for endpoint in s.endpoints or []:
            # Per the API: an unset `ready` means ready; terminating endpoints are never ready.
            ready = endpoint.conditions is None or endpoint.conditions.ready is not False
            pod = endpoint.target_ref.name if endpoint.target_ref is not None else "?"
            for address in endpoint.addresses or []:
                host = f"[{address}]" if ":" in address else address
                yield pod, f"{host}:{ports[0].port}", ready


def ready_addresses(slices: dict[str, object], port_name: str | None) -> list[str]:
    """HOST:PORT of every ready endpoint over all slices, sorted."""
    return sorted({address for _, address, ready in slice_endpoints(slices.values(), port_name) if ready})


class EndpointSliceWatcher:
    """Calls on_change(addresses) on the given event loop whenever the ready set changes.
    The kubernetes client is synchronous, so the watch runs on its own daemon thread."""

    def __init__(self, api_client, namespace: str, service: str, on_change: Callable[[list[str]], None],
                 loop: asyncio.AbstractEventLoop, port_name: str | None = "grpc", timeout_s: int = 300):
        from kubernetes import client

        self.api = client.DiscoveryV1Api(api_client)
        self.namespace, self.service, self.port_name = namespace, service, port_name
        self.on_change, self.loop, self.timeout_s = on_change, loop, timeout_s
        self._stop = threading.Event()
        self._slices: dict[str, object] = {}
        self._published: list[str] | None = None
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        addresses = ready_addresses(self._slices, self.port_name)
        if addresses != self._published:
            self._published = addresses
            log.info("shard endpoints of %s/%s: %s", self.namespace, self.service, addresses or "none ready")
            self.loop.call_soon_threadsafe(self.on_change, addresses)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        selector = f"{SERVICE_NAME_LABEL}={self.service}"
        backoff = 0.5
        while not self._stop.is_set():
            try:
                listed = self.api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                self._slices = {s.metadata.name: s for s in listed.items}
                self._publish()
                version = listed.metadata.resource_version
                stream = watch.Watch().stream(self.api.list_namespaced_endpoint_slice, self.namespace,
                                              label_selector=selector, resource_version=version,
                                              timeout_seconds=self.timeout_s)
                for event in stream:
                    if self._stop.is_set():
                        return
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        self._slices.pop(obj.metadata.name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._slices[obj.metadata.name] = obj
                    self._publish()
                backoff = 0.5  # the watch ended normally (server timeout): list again
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion is too old; list again
                    log.warning("EndpointSlice watch failed: %s %s", exc.status, exc.reason)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            except Exception as exc:  # noqa: BLE001 - the API server may be away for a while
                log.warning("EndpointSlice watch failed: %s", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


def kubernetes_api_client(kubeconfig: str | None):
    """In-cluster credentials (service account) unless a kubeconfig file is given."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()
