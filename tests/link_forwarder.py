"""The wire between the hosts of tests/cluster.py, made in user space: delay, jitter, loss, a rate, and
one-way cuts, for kernels without sch_netem (tc netem answers "unknown qdisc" on them).

Every host's namespace gets a TUN device. A host whose links are shaped routes what it sends to other
hosts into its TUN; this process reads each packet there and writes it into the destination host's TUN,
where that host's kernel receives it as from a cable. On the way it holds the packet for the link's
delay (plus jitter, keeping order, as a wire does), paces it to the link's rate, or drops it (loss, a
cut). The packets are the real IP packets of the real connections: a lost one is retransmitted by TCP,
a delayed one costs its round trip.

Started by Cluster.links: argv[1] is a JSON map {host ip: [namespace, tun name]}. It opens every TUN,
prints "ready", then reads one JSON line per change on stdin:
    {"from": ip, "delay_ms": 5, "jitter_ms": 0, "loss_pct": 1, "rate_mbit": 0}   what `from` sends
    {"cut": [ip_a, ip_b], "on": true}                                             a -> b drops all
It exits when stdin closes; the TUNs (and every route through them) go with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import itertools
import json
import os
import random
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def open_tun(netns: str, name: str) -> int:
    """A TUN device in the namespace (it lives as long as the descriptor); IP packets, no header."""
    own = f"/proc/{os.getpid()}/ns/net"
    home = os.open(own, os.O_RDONLY)
    try:
        _setns(f"/run/netns/{netns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        return fd
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(home)


@dataclass
class Link:
    """What one host sends: the same for every destination, as netem on its interface would do."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rate_bps: float = 0.0
    free_at: float = 0.0  # when the wire has sent the last packet (rate)
    last_due: float = 0.0  # the last packet's delivery time: jitter never reorders

    def due(self, now: float, size: int) -> float:
        departs = now
        if self.rate_bps:
            departs = self.free_at = max(now, self.free_at) + size * 8 / self.rate_bps
        jitter = random.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        self.last_due = max(departs + max(0.0, self.delay_s + jitter), self.last_due)
        return self.last_due


class Wire:
    def __init__(self, tuns: dict[str, int]):
        self.tuns = tuns  # host ip -> its TUN descriptor
        self.links = {ip: Link() for ip in tuns}
        self.cut: set[tuple[str, str]] = set()
        self.pending: list[tuple[float, int, int, bytes]] = []  # (due, order, fd, packet)
        self.order = itertools.count()

    def change(self, line: str) -> None:
        change = json.loads(line)
        if "cut" in change:
            pair = tuple(change["cut"])
            (self.cut.add if change["on"] else self.cut.discard)(pair)
            return
        link = self.links[change["from"]]
        link.delay_s = change.get("delay_ms", 0) / 1000
        link.jitter_s = change.get("jitter_ms", 0) / 1000
        link.loss = change.get("loss_pct", 0) / 100
        link.rate_bps = change.get("rate_mbit", 0) * 1e6

    def carry(self, source: str, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # not IPv4: the hosts speak nothing else
        dest = socket.inet_ntoa(packet[16:20])
        out, link = self.tuns.get(dest), self.links[source]
        if out is None or (source, dest) in self.cut or (link.loss and random.random() < link.loss):
            return
        heapq.heappush(self.pending, (link.due(time.monotonic(), len(packet)), next(self.order), out, packet))

    def deliver(self) -> float | None:
        """Writes what is due; returns how long until the next packet is, or None."""
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, _, fd, packet = heapq.heappop(self.pending)
            with contextlib.suppress(OSError):  # the host's queue is full: lost, as on a wire
                os.write(fd, packet)
        return max(0.0, self.pending[0][0] - now) if self.pending else None


def serve(hosts: dict[str, list[str]]) -> None:
    wire = Wire({ip: open_tun(netns, name) for ip, (netns, name) in hosts.items()})
    selector = selectors.DefaultSelector()
    for ip, fd in wire.tuns.items():
        selector.register(fd, selectors.EVENT_READ, ip)
    selector.register(0, selectors.EVENT_READ, None)
    print("ready", flush=True)
    commands = b""
    while True:
        for key, _ in selector.select(wire.deliver()):
            if key.data is None:
                read = os.read(0, 65536)
                if not read:
                    return
                *lines, commands = (commands + read).split(b"\n")
                for line in lines:
                    wire.change(line.decode())
                continue
            with contextlib.suppress(BlockingIOError):
                while True:
                    wire.carry(key.data, os.read(key.fd, 65536))


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
