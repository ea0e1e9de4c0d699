"""A webhook receiver for Alertmanager's notifications, on a loopback port: what an on-call pager
would get (Alertmanager's webhook payload, version 4)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertWebhook:
    def __init__(self):
        self.notifications: list[dict] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._changed:
                    receiver.notifications.append(json.loads(body))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "AlertWebhook":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self) -> list[dict]:
        """Every alert of every notification so far, in order, each with its notification's status."""
        with self._changed:
            return [a for n in self.notifications for a in n["alerts"]]

    def wait_for(self, alertname: str, status: str, timeout: float, **labels) -> dict | None:
        """The first notified alert named alertname with this status ('firing' / 'resolved') and these
        labels, waiting up to timeout seconds for it; None when none came."""
        def found():
            return next((a for n in self.notifications for a in n["alerts"]
                         if a["labels"].get("alertname") == alertname and a["status"] == status
                         and all(a["labels"].get(k) == v for k, v in labels.items())), None)

        with self._changed:
            self._changed.wait_for(found, timeout)
            return found()
