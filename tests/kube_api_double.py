"""A test double for the Kubernetes API server: just the calls the mesh makes, in the real JSON.

EndpointSlices (discovery.k8s.io/v1): list and watch (chunked stream of watch events, as the API
server sends them), filtered by the kubernetes.io/service-name label. StatefulSets (apps/v1): get,
and get/patch of the scale subresource. The real `kubernetes` Python client talks to it over HTTP.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

SLICES = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices$")
STATEFULSET = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/statefulsets/([^/]+)(/scale)?$")


class KubeApiDouble:
    def __init__(self):
        self._lock = threading.Lock()
        self._version = 1
        self._slices: dict[tuple[str, str], dict] = {}  # (namespace, name) -> EndpointSlice
        self._statefulsets: dict[tuple[str, str], int] = {}  # (namespace, name) -> replicas
        self._watchers: list[tuple[str, str, queue.Queue]] = []  # namespace, service, events
        self.patches: list[dict] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                double._get(self)

            def do_PATCH(self):
                double._patch(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "KubeApiDouble":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            for _, _, events in self._watchers:
                events.put(None)
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double", "user": {}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double"}}],
        }))
        return path

    # --- state the test sets ---

    def set_endpoints(self, namespace: str, service: str, endpoints: list[tuple[str, int, bool]], pod_prefix="shard"):
        """One slice per endpoint (loopback replicas differ by port, and a slice has one port list)."""
        with self._lock:
            wanted = {}
            for i, (ip, port, ready) in enumerate(endpoints):
                name = f"{service}-{ip.replace('.', '-')}-{port}"
                wanted[name] = {
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                    "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
                    "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": False},
                                   "targetRef": {"kind": "Pod", "name": f"{pod_prefix}-{i}", "namespace": namespace}}],
                }
            existing = {n for (ns, n), s in self._slices.items() if ns == namespace and _service(s) == service}
            for name in existing - set(wanted):
                self._emit("DELETED", self._slices.pop((namespace, name)))
            for name, obj in wanted.items():
                kind = "MODIFIED" if name in existing else "ADDED"
                self._slices[(namespace, name)] = obj
                self._emit(kind, obj)

    def set_statefulset(self, namespace: str, name: str, replicas: int) -> None:
        with self._lock:
            self._statefulsets[(namespace, name)] = replicas

    def replicas(self, namespace: str, name: str) -> int:
        with self._lock:
            return self._statefulsets[(namespace, name)]

    def _emit(self, kind: str, obj: dict) -> None:  # holds the lock
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        for namespace, service, events in self._watchers:
            if obj["metadata"]["namespace"] == namespace and _service(obj) == service:
                events.put({"type": kind, "object": json.loads(json.dumps(obj))})

    # --- HTTP ---

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if m := SLICES.match(url.path):
            service = query.get("labelSelector", "").partition("kubernetes.io/service-name=")[2]
            if query.get("watch", "").lower() == "true":
                return self._watch(h, m.group(1), service)
            with self._lock:
                items = [s for (ns, _), s in self._slices.items() if ns == m.group(1) and _service(s) == service]
                body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                        "metadata": {"resourceVersion": str(self._version)}, "items": items}
            return _send(h, 200, body)
        if m := STATEFULSET.match(url.path):
            return self._statefulset(h, m.group(1), m.group(2), bool(m.group(3)))
        _send(h, 404, _status(404, "NotFound", f"{url.path} is not served by this double"))

    def _watch(self, h: BaseHTTPRequestHandler, namespace: str, service: str) -> None:
        events: queue.Queue = queue.Queue()
        with self._lock:
            self._watchers.append((namespace, service, events))
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            while (event := events.get()) is not None:
                line = (json.dumps(event) + "\n").encode()
                h.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                h.wfile.flush()
        except OSError:
            pass
        finally:
            with self._lock:
                self._watchers.remove((namespace, service, events))

    def _statefulset(self, h, namespace: str, name: str, scale: bool, replicas: int | None = None) -> None:
        with self._lock:
            if (namespace, name) not in self._statefulsets:
                return _send(h, 404, _status(404, "NotFound", f'statefulsets.apps "{name}" not found'))
            if replicas is not None:
                self._statefulsets[(namespace, name)] = replicas
            n = self._statefulsets[(namespace, name)]
        meta = {"name": name, "namespace": namespace, "resourceVersion": str(self._version)}
        if scale:
            body = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": meta,
                    "spec": {"replicas": n}, "status": {"replicas": n}}
        else:
            body = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
                    "spec": {"replicas": n, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                             "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}},
                    "status": {"replicas": n, "readyReplicas": n}}
        _send(h, 200, body)

    def _patch(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        m = STATEFULSET.match(url.path)
        if not m or not m.group(3):
            return _send(h, 404, _status(404, "NotFound", f"PATCH {url.path} is not served by this double"))
        self.patches.append({"content_type": h.headers.get("Content-Type"), "body": body})
        replicas = body.get("spec", {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            return _send(h, 422, _status(422, "Invalid", "spec.replicas must be a non-negative integer"))
        self._statefulset(h, m.group(1), m.group(2), True, replicas)


def _service(obj: dict) -> str:
    return obj["metadata"].get("labels", {}).get("kubernetes.io/service-name", "")


def _status(code: int, reason: str, message: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message}


def _send(h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
    data = json.dumps(body).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
