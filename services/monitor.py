"""Prometheus and Alertmanager beside a local mesh, with the chart's rules: `make monitor`.

    python -m services.monitor --shards 2      # the same --shards as `make run`

Debian's `prometheus` and `prometheus-alertmanager` packages provide the binaries. Each server keeps its
data in a directory of its own and listens on loopback. Prometheus scrapes every service of the mesh as
the launcher plans it, evaluates charts/llm-mesh/rules/llm-mesh.rules.yaml, keeps exemplars, and sends
its alerts to the Alertmanager. The tests start the same pair with short intervals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.launcher import MeshPlan, plan_mesh

RULES = Path(__file__).resolve().parent.parent / "charts" / "llm-mesh" / "rules" / "llm-mesh.rules.yaml"


def binaries() -> tuple[str, str] | None:
    """(prometheus, alertmanager) from PATH, or None when either is missing."""
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    return (prometheus, alertmanager) if prometheus and alertmanager else None


def mesh_targets(plan: MeshPlan) -> dict[str, list[str]]:
    """Scrape targets by job: every service whose /metrics is on (a metrics port of 0 is off)."""
    jobs = {"gateway": [plan.gateway], "tokenizer": [plan.tokenizer], "cache": [plan.cache], "shard": plan.shards}
    return {f"llmmesh-{job}": [f"127.0.0.1:{s.metrics_port}" for s in specs if s.metrics_port]
            for job, specs in jobs.items()}


@dataclass
class Intervals:
    scrape: str = "15s"
    evaluation: str = "15s"
    # Alertmanager: how long a new group waits for more alerts, and between notifications of one group.
    group_wait: str = "30s"
    group_interval: str = "5m"
    repeat: str = "4h"


@dataclass
class Monitor:
    root: Path
    targets: dict[str, list[str]]
    rule_files: list[Path] = field(default_factory=lambda: [RULES])
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    intervals: Intervals = field(default_factory=Intervals)
    webhook_url: str | None = None  # where Alertmanager sends notifications (None: nowhere)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def prometheus_config(self) -> dict:
        i = self.intervals
        return {
            "global": {"scrape_interval": i.scrape, "evaluation_interval": i.evaluation},
            "rule_files": [str(p) for p in self.rule_files],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self.targets.items() if targets],
        }

    def alertmanager_config(self) -> dict:
        i = self.intervals
        receiver = {"name": "default"}
        if self.webhook_url:
            receiver["webhook_configs"] = [{"url": self.webhook_url, "send_resolved": True}]
        return {"route": {"receiver": "default", "group_by": ["alertname", "address", "instance", "tenant"],
                          "group_wait": i.group_wait, "group_interval": i.group_interval,
                          "repeat_interval": i.repeat},
                "receivers": [receiver]}

    def start(self, timeout: float = 60.0) -> "Monitor":
        found = binaries()
        if found is None:
            raise RuntimeError("prometheus and prometheus-alertmanager are not installed "
                               "(apt-get install -y prometheus prometheus-alertmanager)")
        prometheus, alertmanager = found
        self.root.mkdir(parents=True, exist_ok=True)
        # JSON is YAML to both servers, and needs no YAML package here.
        (self.root / "prometheus.yml").write_text(json.dumps(self.prometheus_config(), indent=2))
        (self.root / "alertmanager.yml").write_text(json.dumps(self.alertmanager_config(), indent=2))
        try:
            self._spawn("alertmanager", [alertmanager, f"--config.file={self.root / 'alertmanager.yml'}",
                                         f"--storage.path={self.root / 'alertmanager-data'}",
                                         f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                                         "--cluster.listen-address="])  # one instance: no gossip port
            self._spawn("prometheus", [prometheus, f"--config.file={self.root / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={self.root / 'prometheus-data'}",
                                       f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                                       "--enable-feature=exemplar-storage"])
            for name, url in (("alertmanager", self.alertmanager_url), ("prometheus", self.prometheus_url)):
                self._wait_ready(name, url, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

    def _wait_ready(self, name: str, url: str, timeout: float) -> None:
        """Until /-/ready answers 200 (bounded), failing at once if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.processes[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}: {self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f}s: {self.log_tail(name)}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def api(self, path: str, **params) -> dict | list:
        """GET one of Prometheus' /api/v1 endpoints; its `data`."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/{path}?{query}", timeout=30) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.monitor", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=1, help="shard replicas of the mesh (as `make run`'s --shards)")
    parser.add_argument("--dir", type=Path, default=Path(".monitor"), help="configuration and data")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument("--webhook-url", help="where Alertmanager sends notifications (default: nowhere)")
    # `make monitor` passes `make run`'s ARGS: the launcher's other options do not change what is scraped.
    args, launcher_only = parser.parse_known_args(argv)
    if launcher_only:
        print(f"[monitor] not monitor options (left to the launcher): {' '.join(launcher_only)}", flush=True)
    plan = plan_mesh("unused", args.shards)  # the launcher's default ports
    monitor = Monitor(args.dir.resolve(), mesh_targets(plan), prometheus_port=args.prometheus_port,
                      alertmanager_port=args.alertmanager_port, webhook_url=args.webhook_url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        monitor.start()
    except RuntimeError as exc:
        parser.exit(1, f"[monitor] {exc}\n")
    targets = ", ".join(t for ts in monitor.targets.values() for t in ts)
    print(f"[monitor] Prometheus:   {monitor.prometheus_url} (alerts: {monitor.prometheus_url}/alerts)\n"
          f"[monitor] Alertmanager: {monitor.alertmanager_url}\n"
          f"[monitor] scraping {targets} with {RULES.name}; data in {args.dir}. Ctrl-C stops both.", flush=True)
    while not stop.wait(0.5):
        for name, proc in monitor.processes.items():
            if proc.poll() is not None:
                print(f"[monitor] {name} exited with code {proc.returncode}:\n{monitor.log_tail(name)}", flush=True)
                stop.set()
    monitor.stop()


if __name__ == "__main__":
    main()
