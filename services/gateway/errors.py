"""The error a request's path raises for its caller, whichever front the caller used."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2

from services.common.errors import retry_later


class RpcError(Exception):
    """An error status for the client, raised anywhere in the request's path. `trailing_metadata`
    carries rich details (e.g. a shard's RetryInfo) through unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple = (),
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.trailing_metadata = trailing_metadata
        self.retry_after_s = retry_after_s


def unavailable_for_now(message: str, retry_after_s: float) -> RpcError:
    """UNAVAILABLE with a RetryInfo (gRPC) and a Retry-After (HTTP): a dependency known to be down,
    refused without waiting on it, while its probe looks for its return."""
    status = retry_later(message, retry_after_s, code_pb2.UNAVAILABLE)
    return RpcError(grpc.StatusCode.UNAVAILABLE, status.details, status.trailing_metadata,
                    retry_after_s=retry_after_s)
