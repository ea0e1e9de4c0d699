"""Flags shared by every service's command line; each flag may also come from the environment."""

from __future__ import annotations

import argparse
import os
import socket

from services.common.internal_auth import INSECURE_ENV, INSECURE_WARNING, TOKEN_ENV, TOKEN_FILE_ENV, read_token_file
from services.common.internal_auth import log as auth_log


def env_default(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_service_args(parser: argparse.ArgumentParser, service: str, default_listen: str) -> None:
    prefix = f"LLMMESH_{service.upper()}_"
    parser.add_argument("--listen", default=env_default(prefix + "LISTEN", default_listen),
                        help=f"host:port to serve gRPC on (env {prefix}LISTEN)")
    parser.add_argument("--metrics-port", type=int, default=int(env_default(prefix + "METRICS_PORT", "0")),
                        help=f"Prometheus /metrics port, 0 for none (env {prefix}METRICS_PORT)")
    parser.add_argument("--grace", type=float, default=float(env_default("LLMMESH_GRACE_S", "30")),
                        help="seconds to finish in-flight calls after SIGTERM (env LLMMESH_GRACE_S)")
    parser.add_argument("--log-level", default=env_default("LLMMESH_LOG_LEVEL", "INFO"))
    parser.add_argument("--tls-cert", default=env_default("LLMMESH_TLS_CERT", ""),
                        help="this service's certificate (PEM); with --tls-key and --tls-ca turns TLS on")
    parser.add_argument("--tls-key", default=env_default("LLMMESH_TLS_KEY", ""))
    parser.add_argument("--tls-ca", default=env_default("LLMMESH_TLS_CA", ""), help="CA that signs peers' certificates")
    parser.add_argument("--tls-client-auth", action="store_true",
                        default=env_default("LLMMESH_TLS_CLIENT_AUTH", "") == "1",
                        help="require callers to present a certificate signed by the CA (mutual TLS)")
    parser.add_argument("--log-format", choices=["text", "json"], default=env_default("LLMMESH_LOG_FORMAT", "text"),
                        help="json: one JSON object per line with trace_id/span_id (env LLMMESH_LOG_FORMAT)")
    parser.add_argument("--internal-token-file", default=env_default(TOKEN_FILE_ENV, ""),
                        help="file (mode 0600) holding the mesh's internal token, sent on calls to the tokenizer, cache "
                             f"and shards and required of their callers; or set it in the environment as "
                             f"{TOKEN_ENV}. Not needed with mutual TLS")
    parser.add_argument("--insecure-internal", action="store_true",
                        default=env_default(INSECURE_ENV, "") == "1",
                        help=f"no internal credential: serve any caller, call without a token (env {INSECURE_ENV}=1)")


def tls_from_args(args):
    from services.common.tls import TlsFiles

    return TlsFiles.from_args(args.tls_cert, args.tls_key, args.tls_ca)


def internal_token_from_args(parser: argparse.ArgumentParser, args, checks_callers: bool = True) -> str | None:
    """The mesh's internal token, or None where there is none to use: --insecure-internal (which logs a
    warning), or mutual TLS, whose client certificate is the credential. Anything else without a token is
    refused at start, so a service never serves its callers unchecked by accident. checks_callers: the
    service requires the credential of its callers (all but the gateway, which only sends it)."""
    if args.insecure_internal:
        auth_log.warning(INSECURE_WARNING, args.listen)
        return None
    if args.internal_token_file:
        try:
            return read_token_file(args.internal_token_file)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    mutual_tls = tls_from_args(args) is not None and (args.tls_client_auth or not checks_callers)
    if mutual_tls:
        return None
    parser.error(f"internal calls need a credential: set {TOKEN_ENV} or --internal-token-file (the launcher "
                 f"makes one per mesh), or run mutual TLS (--tls-cert/--tls-key/--tls-ca"
                 f"{' --tls-client-auth' if checks_callers else ''}); --insecure-internal turns the check off")


def instance_id(listen: str) -> str:
    return f"{socket.gethostname()}:{listen.rsplit(':', 1)[-1]}"
