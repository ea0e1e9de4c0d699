"""Messages the gateway exchanges with the services behind it, counted per peer and direction, so the
cost of a token's way out can be read off /metrics: internal messages per generated token
(llmmesh_internal_messages_total / llmmesh_generation_tokens_total). Background traffic (health
watches, prefix-index feeds, vocabulary refreshes) is not request traffic and is not counted."""

from __future__ import annotations

from prometheus_client import Counter

INTERNAL_MESSAGES = Counter("llmmesh_internal_messages", "gRPC messages the gateway exchanged with its backends "
                            "for requests", ["peer", "direction"])
_COUNTERS = {(peer, d): INTERNAL_MESSAGES.labels(peer, d)
             for peer in ("shard", "tokenizer", "cache") for d in ("sent", "received")}


def sent(peer: str, n: int = 1) -> None:
    _COUNTERS[peer, "sent"].inc(n)


def received(peer: str, n: int = 1) -> None:
    _COUNTERS[peer, "received"].inc(n)


def round_trip(peer: str) -> None:
    """A unary call that got its reply."""
    _COUNTERS[peer, "sent"].inc()
    _COUNTERS[peer, "received"].inc()
