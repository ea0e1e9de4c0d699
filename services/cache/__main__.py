"""python -m services.cache [--listen HOST:PORT] [--response-budget-mb N] [--kv-budget-mb N]"""

from __future__ import annotations

import argparse
import asyncio

from llmmesh.v1 import cache_pb2, cache_pb2_grpc
from services.cache.server import CacheServicer
from services.cache.store import LRUByteStore
from services.common.cli import add_service_args, env_default, instance_id, internal_token_from_args, tls_from_args
from services.common.logs import setup_logging
from services.common.server import ServeOptions, serve
from services.common.telemetry import setup_tracing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.cache", description="llm-mesh cache service")
    add_service_args(parser, "cache", "127.0.0.1:50053")
    parser.add_argument("--response-budget-mb", type=float,
                        default=float(env_default("LLMMESH_CACHE_RESPONSE_BUDGET_MB", "256")),
                        help="byte budget of the response cache (LRU eviction beyond it)")
    parser.add_argument("--kv-budget-mb", type=float, default=float(env_default("LLMMESH_CACHE_KV_BUDGET_MB", "2048")),
                        help="byte budget of the shared KV prefix blocks (LRU eviction beyond it)")
    args = parser.parse_args(argv)
    setup_logging("cache", args.log_level, args.log_format)
    setup_tracing("cache", instance_id(args.listen))
    token = internal_token_from_args(parser, args)
    servicer = CacheServicer(LRUByteStore(int(args.response_budget_mb * (1 << 20))),
                             LRUByteStore(int(args.kv_budget_mb * (1 << 20))))

    def register(server):
        cache_pb2_grpc.add_CacheServicer_to_server(servicer, server)
        return [cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name]

    asyncio.run(serve(ServeOptions("cache", args.listen, args.metrics_port, args.grace, tls_from_args(args),
                                   args.tls_client_auth, internal_token=token), register))


if __name__ == "__main__":
    main()
