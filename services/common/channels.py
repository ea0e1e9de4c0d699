"""Long-lived client channels between services, traced, with the mesh's message limits."""

from __future__ import annotations

import grpc

from services.common.internal_auth import send_token_interceptors
from services.common.telemetry import client_interceptors
from services.common.tls import TlsFiles

MAX_MESSAGE_BYTES = 64 << 20
# A partition sends no reset: a connection whose peer went silent is found by its keepalive pings,
# one every KEEPALIVE_S, given up KEEPALIVE_TIMEOUT_S after one goes unanswered. So a stream to a
# cut-off shard fails (and resumes elsewhere) within KEEPALIVE_BOUND_S.
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 10, 5
KEEPALIVE_BOUND_S = KEEPALIVE_S + KEEPALIVE_TIMEOUT_S

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Servers accept those pings on idle connections too (their default asks for 5 minutes between
    # them, and answers more frequent ones with GOAWAY "too_many_pings").
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    # A service back from a restart is reached again within a second, not after gRPC's default
    # backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A name that resolves to several pods (a headless Service, "dns:///tokenizer:50052") gets a
    # subchannel per pod and requests spread over them; one address behaves as before.
    ("grpc.lb_policy_name", "round_robin"),
]


def make_channel(address: str, tls: TlsFiles | None = None, token: str | None = None) -> grpc.aio.Channel:
    """tls: present this service's certificate and check the peer against the CA (mutual TLS).
    token: the mesh's internal token, sent on every call (internal_auth.py)."""
    interceptors = [*(send_token_interceptors(token) if token else []), *client_interceptors()]
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=GRPC_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=interceptors)
