"""Several hosts on one machine, for tests of the mesh as a distributed system.

Each host is a network namespace with its own address on one bridge (veth pairs, iproute2); the test
process reaches them through the bridge's own address. A host runs any service with its normal command
line. A host can be cut off (its cable pulled: packets vanish silently, as on a real partition, so only
timeouts and keepalives can notice) and reconnected, one host's packets to another dropped (a one-way
partition), and a host can crash (every process in it SIGKILLed). What a host sends to the other hosts
can be delayed, jittered, lost and rate-limited: those packets go through a user-space wire
(tests/link_forwarder.py), since tc netem is missing from kernels built without sch_netem; the test
process's own traffic with the hosts stays on the bridge. Everything is removed on close, also when a
test failed.

Needs root (CAP_NET_ADMIN); `cluster_unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 50051  # every host has ports of its own
RAY = str(Path(sys.executable).with_name("ray"))
# `ray start --head` turns token authentication on by default; these hosts are namespaces of one
# machine, so their clusters run without it (a deployment shares the token with every node instead).
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def cluster_unavailable() -> str | None:
    """Why hosts cannot be made here (no iproute2, not permitted), or None."""
    probe = f"llmprobe{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    dev: str  # its end of the veth pair, inside the namespace
    tun: str  # its device on the user-space wire, once Cluster.links() runs
    processes: list[subprocess.Popen] = field(default_factory=list)

    def address(self, port: int) -> str:
        return f"{self.ip}:{port}"


class Cluster:
    """hosts: their names, e.g. ["gateway", "tokenizer", "shard0"]."""

    def __init__(self, hosts: list[str], log_dir: Path, subnet: int = 0):
        tag = f"lm{os.getpid() % 100000}{subnet % 10}"
        self.bridge = f"{tag}br"
        self.net = f"10.{200 + subnet % 50}.{os.getpid() % 250}"  # a /24 of this process
        self.gateway_ip = f"{self.net}.254"  # the bridge's address: the test process's way in
        self.log_dir = log_dir
        self.ray_temp_dirs: list[Path] = []  # start_ray's, removed on close
        self.hosts = {name: Host(name, f"{tag}-{name}", f"{self.net}.{i + 1}", f"{tag}v{i}", f"{tag}t{i}")
                      for i, name in enumerate(hosts)}
        self._wire: subprocess.Popen | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts.values()):
            outside = f"{host.dev}b"
            subprocess.run(["ip", "netns", "add", host.netns], check=True, capture_output=True)
            _ip("link", "add", host.dev, "type", "veth", "peer", "name", outside)
            _ip("link", "set", host.dev, "netns", host.netns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("addr", "add", f"{host.ip}/24", "dev", host.dev, netns=host.netns)
            _ip("link", "set", host.dev, "up", netns=host.netns)
            _ip("link", "set", "lo", "up", netns=host.netns)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # --- processes ---

    def start(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Run argv on the host (cwd: the repository; python: this interpreter); output to a log file."""
        h = self.hosts[host]
        argv = [sys.executable if a == "python" else a for a in argv]
        log = open(self.log_dir / f"{host}-{len(h.processes)}.log", "wb")
        proc = subprocess.Popen(["ip", "netns", "exec", h.netns, *argv], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        log.close()
        h.processes.append(proc)
        return proc

    def crash(self, host: str) -> None:
        """SIGKILL every process in the host, as a power cut would end them."""
        h = self.hosts[host]
        pids = subprocess.run(["ip", "netns", "pids", h.netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for proc in h.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        h.processes.clear()

    # --- links ---

    def links(self) -> subprocess.Popen:
        """The user-space wire (tests/link_forwarder.py), started on first use: a TUN in every host."""
        if self._wire is None:
            hosts = {h.ip: [h.netns, h.tun] for h in self.hosts.values()}
            self._wire = subprocess.Popen([sys.executable, "-m", "tests.link_forwarder", json.dumps(hosts)], cwd=ROOT,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if self._wire.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the link forwarder did not start (exit {self._wire.wait(10)})")
            for h in self.hosts.values():
                _ip("link", "set", h.tun, "up", netns=h.netns)
        return self._wire

    def _tell_wire(self, **change) -> None:
        self.links().stdin.write(json.dumps(change) + "\n")
        self._wire.stdin.flush()

    def _route_via_wire(self, host: str, destinations: list[str], on: bool) -> None:
        h = self.hosts[host]
        for dest in destinations:
            if on:
                _ip("route", "replace", dest, "dev", h.tun, "src", h.ip, netns=h.netns)
            else:
                _ip("route", "del", dest, "dev", h.tun, netns=h.netns, check=False)

    def shape(self, host: str, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0,
              rate_mbit: float = 0) -> None:
        """What the host sends to the other hosts: delayed by delay_ms (± jitter_ms, in order), each
        packet lost with loss_pct % chance, paced to rate_mbit (0: unlimited)."""
        self._tell_wire(**{"from": self.hosts[host].ip}, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct,
                        rate_mbit=rate_mbit)
        # Two halves of the /24 are more specific than the bridge's own route; the test process's
        # address keeps its /32 on the bridge.
        self._route_via_wire(host, [f"{self.net}.0/25", f"{self.net}.128/25"], True)
        h = self.hosts[host]
        _ip("route", "replace", f"{self.gateway_ip}/32", "dev", h.dev, "src", h.ip, netns=h.netns)

    def unshape(self, host: str) -> None:
        if self._wire is None:
            return
        self._route_via_wire(host, [f"{self.net}.0/25", f"{self.net}.128/25"], False)
        self._tell_wire(**{"from": self.hosts[host].ip})

    def partition(self, a: str, b: str, both_ways: bool = True) -> None:
        """a's packets to b vanish (and b's to a, both_ways); each keeps every other link."""
        for src, dst in [(a, b), (b, a)][:2 if both_ways else 1]:
            self._tell_wire(cut=[self.hosts[src].ip, self.hosts[dst].ip], on=True)
            self._route_via_wire(src, [f"{self.hosts[dst].ip}/32"], True)

    def heal(self, a: str, b: str) -> None:
        for src, dst in [(a, b), (b, a)]:
            if self._wire is not None:
                self._tell_wire(cut=[self.hosts[src].ip, self.hosts[dst].ip], on=False)
            self._route_via_wire(src, [f"{self.hosts[dst].ip}/32"], False)

    def isolate(self, host: str) -> None:
        """Cut the host's cable: its packets and packets to it vanish, with no reset and no error on
        either side, as on a real partition; only timeouts and keepalives can tell."""
        _ip("link", "set", f"{self.hosts[host].dev}b", "down")
        if self._wire is not None:  # shaped hosts' packets go by the wire, not the cable
            for other in self.hosts.values():
                self._tell_wire(cut=[self.hosts[host].ip, other.ip], on=True)
                self._tell_wire(cut=[other.ip, self.hosts[host].ip], on=True)

    def reconnect(self, host: str) -> None:
        _ip("link", "set", f"{self.hosts[host].dev}b", "up")
        if self._wire is not None:
            for other in self.hosts.values():
                self._tell_wire(cut=[self.hosts[host].ip, other.ip], on=False)
                self._tell_wire(cut=[other.ip, self.hosts[host].ip], on=False)

    # --- teardown ---

    def close(self) -> None:
        if self._wire is not None:  # its TUNs, and the routes through them, go with it
            with contextlib.suppress(Exception):
                self._wire.stdin.close()
                self._wire.wait(10)
            self._wire.kill()
        for name, h in self.hosts.items():
            with contextlib.suppress(Exception):
                self.crash(name)
            subprocess.run(["ip", "link", "del", f"{h.dev}b"], capture_output=True)  # and its peer
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for temp in self.ray_temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def start_mesh(cluster: Cluster, model_dir: Path, shards: dict[str, list[str]], shard_model: Path | None = None,
               gateway_args: list[str] = (), env: dict[str, str] | None = None, timeout_s: float = 240,
               tokenizers: tuple[str, ...] = ("tokenizer",)) -> str:
    """A tokenizer on each host of `tokenizers`, the cache and the gateway on the hosts of those names, a
    shard on each host of `shards` (with its extra arguments); returns the gateway's address once every
    service is healthy."""
    from services.launcher import wait_healthy

    at = {name: cluster[name].address(PORT) for name in ("gateway", "cache", *tokenizers, *shards)}
    started = {host: cluster.start(host, ["python", "-m", "services.tokenizer", "--listen", at[host], "--model",
                                          str(model_dir)], env) for host in tokenizers}
    started["cache"] = cluster.start("cache", ["python", "-m", "services.cache", "--listen", at["cache"]], env)
    for host, extra in shards.items():
        started[host] = cluster.start(host, ["python", "-m", "services.model_shard", "--listen", at[host], "--model",
                                             str(shard_model or model_dir), "--cache", at["cache"], *extra], env)
    for name, proc in started.items():
        wait_healthy(at[name], timeout_s, proc)
    # Last, as a deployment would: the gateway is ready once a shard's health says it serves.
    gateway = cluster.start("gateway", [
        "python", "-m", "services.gateway", "--listen", at["gateway"], "--tokenizer",
        ",".join(at[h] for h in tokenizers), "--cache", at["cache"], "--shards", ",".join(at[h] for h in shards),
        *gateway_args], env)
    wait_healthy(at["gateway"], timeout_s, gateway)
    return at["gateway"]


def start_ray(cluster: Cluster, head: str, nodes: dict[str, int], timeout_s: float = 120) -> str:
    """A Ray cluster, as its documented commands start one (docs/across-nodes.md): the head on `head`,
    then a node on each other host of `nodes` (host -> CPU slots it offers; the head's own are
    nodes.get(head, 1)); returns the head's address once every node is up."""
    address = cluster[head].address(6379)
    hosts = [head, *(h for h in nodes if h != head)]
    for count, host in enumerate(hosts, 1):
        join_ray(cluster, host, None if host == head else address, nodes.get(host, 1), count, timeout_s, head=head)
    return address


def join_ray(cluster: Cluster, host: str, address: str | None, cpus: int, alive: int, timeout_s: float = 120,
             head: str | None = None) -> None:
    """`ray start` on the host: the head when address is None, else a node joining it; returns once
    `alive` nodes are up, as a driver on `head` (default: this host) sees them. A host may join
    again after a crash: each start gets a temp directory of its own."""
    # Short: Ray's socket paths live under it.
    temp = Path(f"/tmp/lmray-{cluster.bridge}-{host}-{len(cluster.ray_temp_dirs)}")
    cluster.ray_temp_dirs.append(temp)
    role = ["--head", "--port", "6379", "--include-dashboard=false"] if address is None else ["--address", address]
    cluster.start(host, [RAY, "start", *role, "--node-ip-address", cluster[host].ip, "--num-cpus", str(cpus),
                         "--temp-dir", str(temp), "--disable-usage-stats", "--block"], RAY_ENV)
    head_address = address or cluster[host].address(6379)
    deadline = time.monotonic() + timeout_s
    while ray_nodes_alive(cluster, head or host, head_address) < alive:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray node on {host} did not join within {timeout_s:.0f}s")


def ray_nodes_alive(cluster: Cluster, host: str, head_address: str) -> int:
    """Ray nodes alive, as a driver on `host` sees them (0 while it cannot connect)."""
    code = (f"import ray; ray.init(address={head_address!r}, _node_ip_address={cluster[host].ip!r}); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    seen = subprocess.run(["ip", "netns", "exec", cluster[host].netns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **RAY_ENV})
    return int(seen.stdout.strip() or 0) if seen.returncode == 0 else 0
