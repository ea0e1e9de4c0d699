"""Rich gRPC error statuses the mesh sends (google.rpc details clients can read)."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Trailing metadata on an INTERNAL status: this one request failed (e.g. its logits were not finite);
# the service that says so is fine, and retrying the request elsewhere would fail the same way.
REQUEST_FAILED_KEY = "llmmesh-request-failed"


def retry_later(message: str, retry_after_s: float, code: int = code_pb2.RESOURCE_EXHAUSTED) -> grpc.Status:
    """RESOURCE_EXHAUSTED (or code, a google.rpc.Code) with a google.rpc.RetryInfo saying when to try again."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(retry_after_s * 1000))
    detail = status_pb2.Status().details.add()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code, message=f"{message}; retry in {retry_after_s:g}s")
    status.details.append(detail)
    return rpc_status.to_status(status)


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay in a received error, if it carries one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None
