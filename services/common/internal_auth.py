"""The internal credential: a token every service sends on its calls to the tokenizer, cache and shards,
which refuse callers without it (UNAUTHENTICATED) before anything of their request is decoded.

Where the mesh runs mutual TLS, the client certificate is the credential instead. Health checks stay
open: Kubernetes probes and the gateway's health watching carry no credential. The token travels as
gRPC metadata; a service reads it from the environment or a file only its user can read, never from its
command line (which every local user can read in /proc/*/cmdline).
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

import grpc
from prometheus_client import Counter

log = logging.getLogger(__name__)

METADATA_KEY = "llmmesh-internal-token"
TOKEN_ENV = "LLMMESH_INTERNAL_TOKEN"
TOKEN_FILE_ENV = "LLMMESH_INTERNAL_TOKEN_FILE"
INSECURE_ENV = "LLMMESH_INSECURE_INTERNAL"  # "1": as --insecure-internal
# Open to every caller: what a probe or a peer's health watch asks, and nothing else.
OPEN_METHODS = ("/grpc.health.v1.Health/",)
INSECURE_WARNING = ("internal calls are not authenticated (--insecure-internal): any process that reaches "
                    "%s can call it, bypassing the gateway's keys, limits and audit")

REFUSED = Counter("llmmesh_internal_calls_refused_total",
                  "internal calls refused for a missing or wrong internal token")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token_file(path: str | Path) -> str:
    """The token in `path`; a file that other users may read or anyone but its owner may change is refused."""
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise ValueError(f"the internal token file {path} is open to other users (mode {stat.S_IMODE(mode):o}): "
                         f"chmod 600 it")
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"the internal token file {path} is empty")
    return token


def write_token_file(path: str | Path, token: str) -> Path:
    """Write `token` to a new file that only this user can read (0600 from its creation on)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


class RequireInternalToken(grpc.aio.ServerInterceptor):
    """Lets a call through only with the mesh's token in its metadata (health checks always). Without
    it, the call is answered UNAUTHENTICATED by a handler that reads none of its messages."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty internal token would let every caller in")
        self._token = token.encode()

    def allows(self, method: str, metadata) -> bool:
        if method.startswith(OPEN_METHODS):
            return True
        sent = next((v for k, v in metadata or () if k == METADATA_KEY), None)
        if isinstance(sent, str):
            sent = sent.encode()
        return sent is not None and hmac.compare_digest(sent, self._token)

    async def intercept_service(self, continuation, handler_call_details):
        if self.allows(handler_call_details.method, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        REFUSED.inc()
        log.debug("refused %s: no valid internal token", handler_call_details.method)
        return _REFUSAL


async def _refuse(requests, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "this service serves only the mesh's own services: the internal token is missing or wrong")
    yield  # an async generator, as a streaming handler is


# On the wire every call is a stream: one stream-stream handler that never reads answers any method,
# known or not, so an unauthenticated caller learns nothing of what the service offers.
_REFUSAL = grpc.stream_stream_rpc_method_handler(_refuse, request_deserializer=lambda data: None)


def _with_token(metadata, token: str):
    pairs = [(k, v) for k, v in (metadata or ()) if k != METADATA_KEY]
    return grpc.aio.Metadata(*pairs, (METADATA_KEY, token))


class _AddsToken:
    def __init__(self, token: str):
        self._token = token

    def _details(self, details):
        return details._replace(metadata=_with_token(details.metadata, self._token))


class _UnaryUnary(_AddsToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddsToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddsToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AddsToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def send_token_interceptors(token: str) -> list:
    """Interceptors that put the token in the metadata of every call on an asyncio channel (one per
    kind of call: a channel files each interceptor under the first kind it is)."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class SendInternalTokenSync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The same for a blocking channel (the launcher's and operators' tools): grpc.intercept_channel."""

    def __init__(self, token: str):
        self._token = token

    def _details(self, d):
        metadata = [(k, v) for k, v in (d.metadata or ()) if k != METADATA_KEY] + [(METADATA_KEY, self._token)]
        return _SyncDetails(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
