"""Flags shared by every service's command line; each flag may also come from the environment."""

from __future__ import annotations

import argparse
import os
import socket


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


def tls_from_args(args):
    from services.common.tls import TlsFiles

    return TlsFiles.from_args(args.tls_cert, args.tls_key, args.tls_ca)


def instance_id(listen: str) -> str:
    return f"{socket.gethostname()}:{listen.rsplit(':', 1)[-1]}"
