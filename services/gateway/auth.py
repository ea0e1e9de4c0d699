"""API keys at the gateway: stored as SHA-256 hashes, one tenant per key, off when no keys are set.

Keys file: one `TENANT SHA256HEX [POLICY...]` line per key (# comments), where POLICY fields such as
`priority=batch weight=2 max_concurrent=16` say what the tenant may ask (tenants.py). Make a line with
    python -m services.gateway.auth --tenant acme SECRET-KEY
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import grpc

from services.gateway.tenants import TenantPolicy


class AuthError(Exception):
    """Becomes UNAUTHENTICATED (gRPC) or 401 (HTTP)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(value: str | None) -> str | None:
    """The key in an `Authorization: Bearer KEY` header value."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class ApiKeys:
    def __init__(self, tenants_by_hash: dict[str, str], policies: dict[str, TenantPolicy] | None = None):
        self._tenants = dict(tenants_by_hash)
        self._policies = dict(policies or {})

    @classmethod
    def from_file(cls, path: str | Path | None) -> "ApiKeys":
        if not path:
            return cls({})
        entries, policies = {}, {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) < 2 or len(parts[1]) != 64:
                raise ValueError(f"{path}:{n}: expected 'TENANT SHA256HEX [name=value ...]'")
            entries[parts[1].lower()] = parts[0]
            policy = TenantPolicy.parse(parts[2:], f"{path}:{n}")
            if policies.setdefault(parts[0], policy) != policy:
                raise ValueError(f"{path}:{n}: tenant {parts[0]!r} has another policy on an earlier line")
        return cls(entries, policies)

    def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's policy (the defaults for a tenant without one, and when keys are off)."""
        return self._policies.get(tenant, TenantPolicy())

    @property
    def tenants(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._tenants.values())))

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def authenticate(self, key: str | None) -> str:
        """The caller's tenant ("anonymous" when auth is off); AuthError otherwise."""
        if not self.enabled:
            return "anonymous"
        if not key:
            raise AuthError("missing API key: send 'authorization: Bearer <key>'")
        tenant = self._tenants.get(hash_key(key))
        if tenant is None:
            raise AuthError("invalid API key")
        return tenant


class AuthenticateFirst(grpc.aio.ServerInterceptor):
    """Checks the key of a call to `service` from its metadata, before its request message is read:
    a caller without a valid key gets UNAUTHENTICATED and nothing of it is parsed."""

    def __init__(self, api_keys: ApiKeys, service: str):
        self.api_keys = api_keys
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.api_keys.enabled or not handler_call_details.method.startswith(self.prefix):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            self.api_keys.authenticate(bearer_token(metadata.get("authorization")))
        except AuthError as exc:
            return _refusal(handler, str(exc))
        return handler


def _refusal(handler, message: str):
    """A handler of the same kind that answers UNAUTHENTICATED without decoding the request."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler is

    def skip(data: bytes) -> None:
        return None

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=skip,
                                                   response_serializer=handler.response_serializer)
    return grpc.unary_stream_rpc_method_handler(refuse_stream, request_deserializer=skip,
                                                response_serializer=handler.response_serializer)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a keys-file line for an API key")
    parser.add_argument("key")
    parser.add_argument("--tenant", default="default")
    args = parser.parse_args()
    print(f"{args.tenant} {hash_key(args.key)}")


if __name__ == "__main__":
    main()
