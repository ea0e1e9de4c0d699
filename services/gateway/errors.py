"""The error a request's path raises for its caller, whichever front the caller used."""

from __future__ import annotations

import grpc


class RpcError(Exception):
    """An error status for the client, raised anywhere in the request's path. `trailing_metadata`
    carries rich details (e.g. a shard's RetryInfo) through unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple = (),
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.trailing_metadata = trailing_metadata
        self.retry_after_s = retry_after_s
