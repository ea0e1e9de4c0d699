"""Consistent hashing: which cache replica owns a key.

Each node sits at many points on a 64-bit ring (virtual nodes, so shares come out even); a key
belongs to the first node point at or after its own hash. Adding a node takes over only the arcs
just before its points, about 1/N of the keys, and removing one hands back only its own.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing(Generic[T]):
    def __init__(self, nodes: dict[str, T] | None = None, vnodes: int = 160):
        """nodes: name (e.g. an address) -> what to hand out for it (e.g. a stub)."""
        self.vnodes = vnodes
        self._nodes: dict[str, T] = {}
        self._points: list[int] = []
        self._owners: list[str] = []
        for name, value in (nodes or {}).items():
            self.add(name, value)

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def names(self) -> list[str]:
        return list(self._nodes)

    def add(self, name: str, value: T) -> None:
        if name in self._nodes:
            raise ValueError(f"{name} is on the ring already")
        self._nodes[name] = value
        for i in range(self.vnodes):
            point = _point(f"{name}#{i}".encode())
            at = bisect.bisect_left(self._points, point)
            self._points.insert(at, point)
            self._owners.insert(at, name)

    def remove(self, name: str) -> None:
        del self._nodes[name]
        keep = [(p, o) for p, o in zip(self._points, self._owners) if o != name]
        self._points = [p for p, _ in keep]
        self._owners = [o for _, o in keep]

    def owner(self, key: bytes) -> str:
        if not self._nodes:
            raise LookupError("the ring has no nodes")
        at = bisect.bisect_left(self._points, _point(key)) % len(self._points)
        return self._owners[at]

    def get(self, key: bytes) -> T:
        return self._nodes[self.owner(key)]

    def node(self, name: str) -> T:
        return self._nodes[name]

    def group(self, keys: Iterable[bytes]) -> dict[str, list[int]]:
        """Owner name -> indices of the keys it owns, in order."""
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.owner(key), []).append(i)
        return groups
