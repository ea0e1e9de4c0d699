"""Several tokenizer replicas behind what the gateway uses as one Tokenizer stub.

`--tokenizer A,B` names them. Each is probed (grpc.health.v1, twice a second, as readiness.py probes one),
and every call goes to the next replica whose last check passed, round robin, so a replica that is down,
hung or cut off from the gateway stops receiving calls within a probe (1.5 s at most) instead of after
keepalive gives up on its connection. The gateway is ready while any replica is. While none is, a call
is refused at once (UNAVAILABLE with a retry delay) rather than left to wait out the tokenizer timeout;
the probes go on, and calls flow again from the first check that passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llmmesh.v1 import tokenizer_pb2_grpc
from services.common.channels import make_channel
from services.gateway.errors import unavailable_for_now
from services.gateway.readiness import probe_health

PROBE_INTERVAL_S = 0.5


class TokenizerReplicas:
    def __init__(self, addresses: list[str], tls=None, probe_interval_s: float = PROBE_INTERVAL_S,
                 token: str | None = None):
        self.addresses = addresses
        self.channels = [make_channel(a, tls, token) for a in addresses]
        self._stubs = [tokenizer_pb2_grpc.TokenizerStub(c) for c in self.channels]
        self.up = [True] * len(addresses)  # until a probe says otherwise
        self.probe_interval_s = probe_interval_s
        self._next = 0

    def stub(self) -> tokenizer_pb2_grpc.TokenizerStub | None:
        """The next replica that serves; None when no replica's last check passed."""
        n = len(self._stubs)
        order = [(self._next + k) % n for k in range(n)]
        chosen = next((i for i in order if self.up[i]), None)
        if chosen is None:
            return None
        self._next = (chosen + 1) % n
        return self._stubs[chosen]

    def __getattr__(self, method: str):
        """Tokenizer RPCs (Encode, DetokenizeStream, ...) as on a stub, each call on a serving replica."""
        if method.startswith("_"):
            raise AttributeError(method)
        stub = self.stub()
        return getattr(stub, method) if stub is not None else self._refuse

    def _refuse(self, *_args, **_kwargs):
        raise unavailable_for_now(f"no tokenizer replica serves (of {len(self._stubs)}; their health checks fail)",
                                  self.probe_interval_s)

    def probes(self, report: Callable[[bool], None]) -> list[asyncio.Task]:
        """Health probes of every replica (in the running loop); report(any replica serves) after each."""
        def reporter(i: int):
            def on_check(up: bool) -> None:
                self.up[i] = up
                report(any(self.up))
            return on_check

        loop = asyncio.get_running_loop()
        return [loop.create_task(probe_health(channel, reporter(i), self.probe_interval_s))
                for i, channel in enumerate(self.channels)]
