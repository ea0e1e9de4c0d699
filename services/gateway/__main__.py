"""python -m services.gateway --tokenizer HOST:PORT[,...] --shards HOST:PORT[,HOST:PORT...] [--cache HOST:PORT]"""

from __future__ import annotations

import argparse
import asyncio

from prometheus_client import REGISTRY

from llmmesh.v1 import cache_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.common.channels import make_channel
from services.common.cli import add_service_args, env_default, instance_id, internal_token_from_args, tls_from_args
from services.common.hash_ring import HashRing
from services.common.logs import setup_logging
from services.common.server import ServeOptions, serve
from services.common.telemetry import setup_tracing
from services.gateway.auth import ApiKeys, AuthenticateFirst
from services.gateway.backend_health import BackendHealthCollector, CacheProbes
from services.gateway.detokenize import TokenizerMirror
from services.gateway.rate_limit import TenantRateLimiter
from services.gateway.readiness import Readiness
from services.gateway.tokenizers import TokenizerReplicas
from services.gateway.server import GatewayConfig, GatewayServicer
from services.gateway.shards import ShardPool
from services.gateway.store.cli import add_store_args, open_store, purge_expired_forever
from services.gateway.validation import Limits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description="llm-mesh gateway")
    add_service_args(parser, "gateway", "127.0.0.1:50051")
    parser.add_argument("--tokenizer", default=env_default("LLMMESH_TOKENIZER_ADDR", "127.0.0.1:50052"),
                        help="HOST:PORT[,HOST:PORT...]: several replicas are probed, and calls go to those that serve")
    parser.add_argument("--cache", default=env_default("LLMMESH_CACHE_ADDR", "127.0.0.1:50053"),
                        help="cache service replicas (HOST:PORT, comma-separated; keys spread by consistent "
                             "hashing); empty for none")
    parser.add_argument("--shards", default=env_default("LLMMESH_SHARD_ADDRS", "127.0.0.1:50061"),
                        help="comma-separated model shard addresses (--discovery static)")
    parser.add_argument("--shard-streams", choices=["batch", "call"], default=env_default("LLMMESH_SHARD_STREAMS", "batch"),
                        help="batch: a shard's requests share one GenerateBatch stream, one message per engine step for "
                             "all of them; call: one Generate call per request")
    parser.add_argument("--discovery", choices=["static", "kubernetes"], default=env_default("LLMMESH_DISCOVERY", "static"),
                        help="kubernetes: follow the ready pods of --shard-service through its EndpointSlices")
    parser.add_argument("--shard-service", default=env_default("LLMMESH_SHARD_SERVICE", "llm-mesh-shard"),
                        help="the shards' headless Service (--discovery kubernetes)")
    parser.add_argument("--namespace", default=env_default("LLMMESH_NAMESPACE", "default"))
    parser.add_argument("--kubeconfig", default=env_default("KUBECONFIG", ""),
                        help="kubeconfig file; empty: the pod's service account (in-cluster)")
    parser.add_argument("--model-name", default=env_default("LLMMESH_MODEL_NAME", "SmolLM2-135M-Instruct"))
    parser.add_argument("--max-tokens-limit", type=int, default=int(env_default("LLMMESH_MAX_TOKENS_LIMIT", "4096")))
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--max-n", type=int, default=16, help="choices one request may ask for (sampling.n)")
    parser.add_argument("--max-prompt-chars", type=int, default=1 << 20,
                        help="characters of prompt (or all messages) one request may send")
    parser.add_argument("--max-request-bytes", type=int, default=0,
                        help="largest request read, gRPC message or HTTP body (default: what --max-prompt-chars "
                             "of 4-byte UTF-8 plus 64 KiB of fields can need); larger ones are refused unread")
    parser.add_argument("--tokenizer-timeout", type=float, default=5.0,
                        help="seconds one tokenizer call may take (a hung tokenizer fails requests, not stalls them)")
    parser.add_argument("--shard-first-token-timeout", type=float, default=60.0,
                        help="seconds a shard may take to send a request's first token (queue and prefill) before "
                             "the request is tried on another replica; a hung shard does not hold it to its deadline")
    parser.add_argument("--no-response-cache", action="store_true")
    parser.add_argument("--shared-response-cache", action="store_true",
                        help="answer every tenant from one response cache (default: each tenant's own, so no "
                             "tenant learns from a hit what another asked)")
    parser.add_argument("--shared-prefix-cache", action="store_true",
                        help="let tenants reuse each other's cached prompt blocks (default: each tenant's blocks are "
                             "its own, so cached_tokens never shows one tenant what another sent)")
    parser.add_argument("--rate-limit-rps", type=float, default=float(env_default("LLMMESH_RATE_LIMIT_RPS", "0")),
                        help="requests per second per tenant (0: no limit)")
    parser.add_argument("--rate-limit-tpm", type=float, default=float(env_default("LLMMESH_RATE_LIMIT_TPM", "0")),
                        help="prompt + completion tokens per minute per tenant (0: no limit)")
    parser.add_argument("--no-prefix-routing", action="store_true",
                        help="route by load only, not to the replica that holds the prompt's prefix")
    parser.add_argument("--audit-prompts", action="store_true", help="put prompt text in audit lines (off: never)")
    parser.add_argument("--http-listen", default=env_default("LLMMESH_GATEWAY_HTTP_LISTEN", ""),
                        help="host:port of the OpenAI-compatible HTTP API; empty for none")
    parser.add_argument("--api-keys-file", default=env_default("LLMMESH_API_KEYS_FILE", ""),
                        help="'TENANT SHA256HEX' lines; when set, every call needs 'authorization: Bearer KEY'")
    add_store_args(parser)
    parser.add_argument("--redact-personal-data", action="store_true",
                        help="take e-mail addresses, phone numbers, card numbers and IBANs out of stored "
                             "conversations and audit lines (the model still sees them)")
    args = parser.parse_args(argv)
    args.max_request_bytes = args.max_request_bytes or 4 * args.max_prompt_chars + (64 << 10)
    setup_logging("gateway", args.log_level, args.log_format)
    setup_tracing("gateway", instance_id(args.listen))

    tls = tls_from_args(args)
    token = internal_token_from_args(parser, args, checks_callers=False)  # sent to the backends, not asked of clients

    async def run():
        # Channels belong to the running event loop: make them inside it.
        tokenizer = TokenizerReplicas([a.strip() for a in args.tokenizer.split(",") if a.strip()], tls, token=token)
        probes: list[asyncio.Task] = []
        caches = [a.strip() for a in args.cache.split(",") if a.strip()]
        cache_channels = {a: make_channel(a, tls, token) for a in caches}
        cache = HashRing({a: cache_pb2_grpc.CacheStub(c) for a, c in cache_channels.items()}) if caches else None
        cache_probes = CacheProbes(cache_channels)
        discovered = args.discovery == "kubernetes"
        shards = ShardPool([] if discovered else [a.strip() for a in args.shards.split(",") if a.strip()],
                           tls=tls, token=token, dynamic=discovered, batched=args.shard_streams == "batch")
        watcher = None
        limits = Limits(max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                        max_prompt_chars=args.max_prompt_chars, max_n=args.max_n)
        config = GatewayConfig(args.model_name, limits, not args.no_response_cache,
                               shared_response_cache=args.shared_response_cache, audit_prompts=args.audit_prompts,
                               shared_prefix_cache=args.shared_prefix_cache,
                               redact_personal_data=args.redact_personal_data,
                               tokenizer_timeout_s=args.tokenizer_timeout,
                               shard_first_message_timeout_s=args.shard_first_token_timeout,
                               prefix_routing=not args.no_prefix_routing)
        api_keys = ApiKeys.from_file(args.api_keys_file)
        vocabulary = TokenizerMirror(tokenizer, timeout_s=args.tokenizer_timeout)
        store = open_store(args)
        servicer = GatewayServicer(config,
                                   tokenizer, cache, shards, api_keys,
                                   TenantRateLimiter(args.rate_limit_rps, args.rate_limit_tpm), vocabulary, store)
        REGISTRY.register(BackendHealthCollector(tokenizer, cache_probes, shards))
        http = {}

        def register(server):
            gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        async def on_start(runtime):
            nonlocal watcher
            # No serving shard, or no tokenizer: the gateway cannot serve either (readiness.py).
            readiness = Readiness(runtime.set_dependencies_ok)
            readiness.set("model shards", shards.available)  # kubernetes discovery starts with none
            shards.on_availability = lambda available: readiness.set("model shards", available)
            probes.extend(tokenizer.probes(lambda up: readiness.set("tokenizer", up)))
            probes.extend(cache_probes.start())
            await runtime.set_dependencies_ok(readiness.ready)
            if store is not None:  # its health is its own: stateless requests go on while it is down
                probes.append(asyncio.get_running_loop().create_task(store.db.watch_forever()))
            if store is not None and store.retention_s:
                probes.append(asyncio.get_running_loop().create_task(purge_expired_forever(store)))
            await vocabulary.refresh()  # best effort: a tokenizer not up yet is asked again by the first request
            shards.start()
            if discovered:
                from services.gateway.discovery import EndpointSliceWatcher, kubernetes_api_client

                watcher = EndpointSliceWatcher(kubernetes_api_client(args.kubeconfig), args.namespace,
                                               args.shard_service, shards.set_addresses, asyncio.get_running_loop())
                watcher.start()
            if args.http_listen:
                from services.gateway.openai_http import OpenAIFront, make_http_server

                host, port = args.http_listen.rsplit(":", 1)
                from services.gateway import anthropic_http, openai_responses

                front = OpenAIFront(servicer, args.model_name, is_serving=lambda: runtime.serving,
                                    max_body_bytes=args.max_request_bytes)
                openai_responses.add_routes(front.app, front, servicer.conversations)
                anthropic_http.add_routes(front.app, front)
                http["server"] = make_http_server(front, host, int(port), tls)
                http["task"] = asyncio.get_running_loop().create_task(http["server"].serve())
                while not http["server"].started:  # bound by uvicorn: it exits the task on failure
                    if http["task"].done():
                        http["task"].result()
                        raise RuntimeError(f"the HTTP API could not start on {args.http_listen}")
                    await asyncio.sleep(0.01)

        async def on_drain():
            if http:
                http["server"].should_exit = True  # stop accepting; in-flight streams finish
                await http["task"]

        async def on_stop():
            for probe in probes:
                probe.cancel()
            if watcher is not None:
                watcher.stop()
            await shards.close()
            if store is not None:
                await store.close()

        service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
        options = ServeOptions("gateway", args.listen, args.metrics_port, args.grace, tls, args.tls_client_auth,
                               max_receive_bytes=args.max_request_bytes,
                               interceptors=(AuthenticateFirst(api_keys, service),))
        await serve(options, register,
                    on_start=on_start, on_stop=on_stop, on_drain=on_drain)

    asyncio.run(run())


if __name__ == "__main__":
    main()
