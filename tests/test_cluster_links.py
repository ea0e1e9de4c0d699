"""The simulated hosts' links (tests/cluster.py, tests/link_forwarder.py) do what the fault tests rely
on: a delay shows in the round trip, loss costs retransmissions but no byte, a rate paces, a one-way
partition drops one direction only, and healing restores it. Measured with plain TCP between hosts."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .cluster import Cluster, cluster_unavailable

pytestmark = pytest.mark.skipif(bool(cluster_unavailable()), reason=str(cluster_unavailable()))
ECHO_PORT = 7000
ECHO = f"""
import socket, threading
server = socket.create_server(("0.0.0.0", {ECHO_PORT}))
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""
# argv: address, rounds, bytes per round, connect timeout; prints the round trips (s) and whether
# every byte came back as sent.
PING = """
import json, os, socket, sys, time
host, rounds, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    conn = socket.create_connection((host, %d), timeout=timeout)
except OSError as err:
    print(json.dumps({"error": type(err).__name__})); sys.exit()
conn.settimeout(60)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts, intact = [], True
for _ in range(rounds):
    sent, got = os.urandom(size), b""
    start = time.perf_counter()
    conn.sendall(sent)
    while len(got) < size:
        got += conn.recv(size - len(got))
    rtts.append(time.perf_counter() - start)
    intact &= got == sent
print(json.dumps({"rtts": rtts, "intact": intact}))
""" % ECHO_PORT


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with Cluster(["a", "b", "c"], tmp_path_factory.mktemp("links"), subnet=2) as cluster:
        cluster.start("a", ["python", "-c", ECHO])
        deadline = time.monotonic() + 30
        while "rtts" not in ping(cluster, "b", "a", 1, 1, 0.5):  # until the echo server listens
            assert time.monotonic() < deadline, "the echo server did not listen within 30 s"
        yield cluster


def ping(cluster: Cluster, src: str, dst: str, rounds: int, size: int, connect_timeout: float = 5) -> dict:
    run = subprocess.run(["ip", "netns", "exec", cluster[src].netns, sys.executable, "-c", PING, cluster[dst].ip,
                          str(rounds), str(size), str(connect_timeout)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_a_delay_shows_in_the_round_trip_and_goes_when_unshaped(hosts):
    assert median(ping(hosts, "b", "a", 10, 64)["rtts"]) < 0.010
    hosts.shape("a", delay_ms=20)
    try:
        rtt = median(ping(hosts, "b", "a", 10, 64)["rtts"])  # a's replies wait 20 ms
        assert 0.020 <= rtt < 0.040, rtt
        hosts.shape("b", delay_ms=10)
        rtt = median(ping(hosts, "b", "a", 10, 64)["rtts"])  # both ways
        assert 0.030 <= rtt < 0.050, rtt
    finally:
        hosts.unshape("a")
        hosts.unshape("b")
    assert median(ping(hosts, "b", "a", 10, 64)["rtts"]) < 0.010


def test_loss_costs_retransmissions_but_no_byte(hosts):
    hosts.shape("a", loss_pct=100)
    try:
        assert ping(hosts, "b", "a", 1, 64, connect_timeout=1) == {"error": "TimeoutError"}  # no SYN-ACK
        hosts.shape("a", loss_pct=20)
        seen = ping(hosts, "b", "a", 40, 16384)
        assert seen["intact"]
        # With a fifth of a's packets lost, some round trip waits for a retransmission timeout.
        assert max(seen["rtts"]) >= 0.2, seen["rtts"]
    finally:
        hosts.unshape("a")


def test_a_rate_paces_what_the_host_sends(hosts):
    hosts.shape("a", rate_mbit=8)
    try:
        seen = ping(hosts, "b", "a", 2, 500_000)  # a sends 4 Mbit back each round: at least 0.5 s
        assert seen["intact"] and min(seen["rtts"]) >= 0.45, seen["rtts"]
    finally:
        hosts.unshape("a")


def test_a_one_way_partition_drops_one_direction_until_healed(hosts):
    hosts.partition("a", "b", both_ways=False)
    try:
        assert ping(hosts, "b", "a", 1, 64, connect_timeout=1) == {"error": "TimeoutError"}  # a's replies vanish
        assert "rtts" in ping(hosts, "c", "a", 1, 64)  # a still answers c
    finally:
        hosts.heal("a", "b")
    assert ping(hosts, "b", "a", 3, 64)["intact"]


def test_close_leaves_no_namespace_link_or_process(tmp_path):
    cluster = Cluster(["x", "y"], tmp_path, subnet=3)
    cluster.shape("x", delay_ms=1)
    cluster.start("x", ["sleep", "600"])
    wire, sleeper = cluster._wire, cluster["x"].processes[0]
    cluster.close()
    assert wire.poll() is not None and sleeper.poll() is not None
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert cluster["x"].netns not in namespaces and cluster.bridge not in links
    assert cluster["x"].tun not in links and cluster["x"].dev not in links
