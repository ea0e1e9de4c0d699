"""Several tokenizer replicas behind what the gateway uses as one Tokenizer stub.

`--tokenizer A,B` names them. Each is probed (grpc.health.v1, twice a second, as readiness.py probes one),
and every call goes to the next replica whose last check passed, round robin, so a replica that is down,
hung or cut off from the gateway stops receiving calls within a probe (1.5 s at most) instead of after
keepalive gives up on its connection. The gateway is ready while any replica is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llmmesh.v1 import tokenizer_pb2_grpc
from services.common.channels import make_channel
from services.gateway.readiness import probe_health


class TokenizerReplicas:
    def __init__(self, addresses: list[str], tls=None):
        self.addresses = addresses
        self.channels = [make_channel(a, tls) for a in addresses]
        self._stubs = [tokenizer_pb2_grpc.TokenizerStub(c) for c in self.channels]
        self.up = [True] * len(addresses)  # until a probe says otherwise
        self._next = 0

    def stub(self) -> tokenizer_pb2_grpc.TokenizerStub:
        """The next replica that serves (any, when none does: its call fails with the real reason)."""
        n = len(self._stubs)
        order = [(self._next + k) % n for k in range(n)]
        chosen = next((i for i in order if self.up[i]), order[0])
        self._next = (chosen + 1) % n
        return self._stubs[chosen]

    def __getattr__(self, method: str):
        """Tokenizer RPCs (Encode, DetokenizeStream, ...) as on a stub, each call on a serving replica."""
        if method.startswith("_"):
            raise AttributeError(method)
        return getattr(self.stub(), method)

    def probes(self, report: Callable[[bool], None]) -> list[asyncio.Task]:
        """Health probes of every replica (in the running loop); report(any replica serves) after each."""
        def reporter(i: int):
            def on_check(up: bool) -> None:
                self.up[i] = up
                report(any(self.up))
            return on_check

        loop = asyncio.get_running_loop()
        return [loop.create_task(probe_health(channel, reporter(i))) for i, channel in enumerate(self.channels)]
