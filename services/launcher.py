"""Start the whole mesh locally, each service its own process, and wait until every one is healthy.

    python -m services.launcher --model models/SmolLM2-135M-Instruct --shards 2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.internal_auth import (INSECURE_ENV, TOKEN_ENV, TOKEN_FILE_ENV, SendInternalTokenSync, new_token,
                                           read_token_file)
from services.tokenizer.tool_prompt import TOOL_FORMATS


@dataclass
class ServiceSpec:
    name: str  # unique in the mesh, e.g. "shard-0"
    module: str  # python -m <module>
    listen: str
    metrics_port: int = 0
    args: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, "--listen", self.listen,
                "--metrics-port", str(self.metrics_port), *self.args]


@dataclass
class MeshPlan:
    gateway: ServiceSpec
    tokenizer: ServiceSpec
    cache: ServiceSpec
    shards: list[ServiceSpec]
    tls_dir: Path | None = None  # certificates from services.common.tls; None: plaintext
    # The mesh's internal token, given to every service in its environment (None: mutual TLS is the
    # credential, or --insecure-internal).
    internal_token: str | None = field(default=None, repr=False)

    @property
    def backends(self) -> list[ServiceSpec]:
        return [self.tokenizer, self.cache, *self.shards]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def plan_mesh(
    model: str,
    shards: int = 1,
    host: str = "127.0.0.1",
    gateway_port: int = 50051,
    ports: list[int] | None = None,
    metrics_ports: list[int] | None = None,
    shard_args: list[str] | None = None,
    gateway_args: list[str] | None = None,
    cache_args: list[str] | None = None,
    tokenizer_args: list[str] | None = None,
    gateway_metrics_port: int = 9400,
    tls_dir: Path | None = None,
    internal_token: str | None = None,
    insecure_internal: bool = False,
) -> MeshPlan:
    """ports / metrics_ports: tokenizer, cache, then one per shard (defaults: 50052.. and 9401..);
    a metrics port of 0 turns that service's /metrics off. Internal calls carry a credential: the
    client certificate with tls_dir, else internal_token (default: a fresh random one); insecure_internal:
    none, and the tokenizer, cache and shards serve any caller."""
    n = 2 + shards
    ports = ports or [50052, 50053, *range(50061, 50061 + shards)]
    metrics_ports = metrics_ports or [9401, 9402, *range(9410, 9410 + shards)]
    if len(ports) != n or len(metrics_ports) != n:
        raise ValueError(f"need {n} ports and {n} metrics ports")
    # Only the gateway listens on `host`: a local mesh keeps the tokenizer, cache and shards on loopback
    # whatever the gateway is exposed on, and they serve only callers with the mesh's credential.
    addr = [f"127.0.0.1:{p}" for p in ports]
    threads = max(1, (os.cpu_count() or 1) // shards)
    shard_specs = [
        ServiceSpec(f"shard-{i}", "services.model_shard", addr[2 + i], metrics_ports[2 + i],
                    ["--model", model, "--threads", str(threads), "--cache", addr[1], *(shard_args or [])])
        for i in range(shards)
    ]
    plan = MeshPlan(
        gateway=ServiceSpec("gateway", "services.gateway", f"{host}:{gateway_port}", gateway_metrics_port,
                            ["--tokenizer", addr[0], "--cache", addr[1], "--shards", ",".join(addr[2:]),
                             "--model-name", Path(model).name, *(gateway_args or [])]),
        tokenizer=ServiceSpec("tokenizer", "services.tokenizer", addr[0], metrics_ports[0],
                              ["--model", model, *(tokenizer_args or [])]),
        cache=ServiceSpec("cache", "services.cache", addr[1], metrics_ports[1], list(cache_args or [])),
        shards=shard_specs,
    )
    if tls_dir is not None:
        # Clients reach the gateway over TLS; services reach each other over mutual TLS.
        for spec in [plan.gateway, *plan.backends]:
            cert = "shard" if spec.name.startswith("shard") else spec.name
            client_auth = spec is not plan.gateway and not insecure_internal
            spec.args += ["--tls-cert", str(tls_dir / f"{cert}.pem"), "--tls-key", str(tls_dir / f"{cert}-key.pem"),
                          "--tls-ca", str(tls_dir / "ca.pem"), *(["--tls-client-auth"] if client_auth else [])]
    plan.tls_dir = tls_dir
    if insecure_internal:
        for spec in [plan.gateway, *plan.backends]:
            spec.args.append("--insecure-internal")
    elif tls_dir is None:
        plan.internal_token = internal_token or new_token()
    return plan


class ServiceFailed(RuntimeError):
    pass


def client_channel(address: str, tls_dir: Path | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to a mesh service, presenting the `client` certificate when the mesh runs TLS, and
    sending the mesh's internal token when it has one."""
    if tls_dir is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials((tls_dir / "ca.pem").read_bytes(),
                                             (tls_dir / "client-key.pem").read_bytes(),
                                             (tls_dir / "client.pem").read_bytes())
        channel = grpc.secure_channel(address, creds)
    return grpc.intercept_channel(channel, SendInternalTokenSync(token)) if token else channel


def wait_healthy(address: str, timeout: float, process: subprocess.Popen | None = None,
                 tls_dir: Path | None = None, service: str = "") -> None:
    """Block until the service at address reports SERVING on grpc.health.v1 (event-driven: a Watch
    stream that waits for the channel), failing early if its process exits. service: the health
    service name ("": ready to serve; services.common.server.LIVENESS_SERVICE: the process runs)."""
    deadline = time.monotonic() + timeout
    with client_channel(address, tls_dir) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceFailed(f"{address} not healthy after {timeout:.0f}s")
            if process is not None and process.poll() is not None:
                raise ServiceFailed(f"{address}: process exited with code {process.returncode}")
            try:
                # Short slices so a crashed process is noticed; each waits on the channel, not a clock.
                for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=min(left, 1.0),
                                        wait_for_ready=True):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    raise


class Mesh:
    """The mesh's processes. Use as a context manager; `stop()` drains with SIGTERM, then kills."""

    def __init__(self, plan: MeshPlan, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.plan = plan
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs = []

    @property
    def gateway_address(self) -> str:
        return self.plan.gateway.listen

    def channel(self, address: str) -> grpc.Channel:
        """A channel to one of the mesh's services with the mesh's credential (e.g. to call a shard)."""
        return client_channel(address, self.plan.tls_dir, self.plan.internal_token)

    def _spawn(self, spec: ServiceSpec) -> subprocess.Popen:
        # The token goes in the environment, which only this user can read (/proc/PID/environ), never
        # in the command line, which every user can. The plan alone decides the credential.
        env = {k: v for k, v in self.env.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV, INSECURE_ENV)}
        if self.plan.internal_token:
            env[TOKEN_ENV] = self.plan.internal_token
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(out)
        proc = subprocess.Popen(spec.argv(), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                cwd=Path(__file__).resolve().parent.parent)
        self.processes[spec.name] = proc
        return proc

    def start(self, timeout: float = 180.0) -> "Mesh":
        try:
            for spec in self.plan.backends:
                self._spawn(spec)
            self._wait(self.plan.backends, timeout)
            self._spawn(self.plan.gateway)
            self._wait([self.plan.gateway], timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_extra(self, spec: ServiceSpec, timeout: float = 180.0) -> None:
        """Start one more process beside the plan's (e.g. a second gateway with other flags)."""
        self._spawn(spec)
        self._wait([spec], timeout)

    def _wait(self, specs: list[ServiceSpec], timeout: float) -> None:
        errors: list[str] = []

        def one(spec: ServiceSpec) -> None:
            try:
                wait_healthy(spec.listen, timeout, self.processes[spec.name], self.plan.tls_dir)
            except Exception as exc:  # noqa: BLE001 - reported together below
                errors.append(f"{spec.name}: {exc}{self.log_tail(spec.name)}")

        threads = [threading.Thread(target=one, args=(s,)) for s in specs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise ServiceFailed("\n".join(errors))

    def log_tail(self, name: str, lines: int = 30) -> str:
        if self.log_dir is None or not (self.log_dir / f"{name}.log").exists():
            return ""
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
        return "\n  | " + "\n  | ".join(text)

    def terminate(self, name: str, grace: float = 30.0) -> int:
        """SIGTERM one service and wait for it to drain and exit (SIGKILL after grace)."""
        proc = self.processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self, name: str) -> None:
        proc = self.processes[name]
        proc.kill()
        proc.wait()

    def restart(self, name: str, timeout: float = 180.0) -> None:
        """Start a service of the plan again (after it was killed or drained) and wait for health."""
        spec = next(s for s in [self.plan.gateway, *self.plan.backends] if s.name == name)
        if self.processes[name].poll() is None:
            self.terminate(name)
        wait_healthy(spec.listen, timeout, self._spawn(spec), self.plan.tls_dir)

    def stop(self, grace: float = 15.0) -> None:
        # The gateway first, so no new work reaches the backends while they drain.
        gateways = ["gateway", *[n for n in self.processes if n.startswith("gateway-")]]
        # Then the plan's backends, and any extra process (start_extra) that is not a gateway.
        order = [*gateways, *[s.name for s in self.plan.backends],
                 *[n for n in self.processes if n not in gateways and n not in {s.name for s in self.plan.backends}]]
        for name in order:
            if name in self.processes and self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        for name in order:
            if name in self.processes:
                self.terminate(name, grace)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


USAGE = """\
llm-mesh is serving {model} on {gateway} ({shards} shard replica{s}).

Call it from Python:

    import grpc
    from llmmesh.v1 import gateway_pb2, gateway_pb2_grpc, common_pb2
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel("{gateway}"))
    req = gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        sampling=common_pb2.SamplingParams(max_tokens=64))
    for chunk in stub.GenerateStream(req):
        print(chunk.text, end="", flush=True)

or from this checkout:  .venv/bin/python -m services.client "What is the capital of France?"
{http}
{internal}
Metrics: http://127.0.0.1:{metrics}/metrics (gateway). Ctrl-C stops the mesh.
"""
INTERNAL = {
    "token": "The tokenizer, cache and shards serve only this mesh's services, which hold its internal token; to\n"
             "add a service by hand, set LLMMESH_INTERNAL_TOKEN for the launcher and for it.",
    "tls": "The tokenizer, cache and shards serve only callers with a certificate from the mesh's CA.",
    "insecure": "Warning: the tokenizer, cache and shards serve any local caller (--insecure-internal).",
}


def open_model_file(path: str, parser: argparse.ArgumentParser) -> Path:
    """A GGUF file's checkpoint folder, converted once here before the services start (they find it)."""
    from services.model_shard.model.families import UnsupportedModel
    from services.model_shard.model.gguf_checkpoint import open_gguf

    print(f"[launcher] opening {path} (converted once, then reused)", flush=True)
    try:
        return open_gguf(path)
    except (UnsupportedModel, OSError) as exc:
        parser.error(f"cannot serve {path}: {exc}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-mesh", description="Run the whole mesh locally")
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct",
                        help="a checkpoint folder (config.json, *.safetensors, tokenizer) or a GGUF file")
    parser.add_argument("--shards", type=int, default=1, help="model shard replicas behind the gateway")
    parser.add_argument("--host", default="127.0.0.1", help="where the gateway listens (gRPC and HTTP); the other "
                        "services always listen on 127.0.0.1")
    parser.add_argument("--gateway-port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API (0: off)")
    parser.add_argument("--api-keys-file", help="require API keys ('TENANT SHA256HEX' lines)")
    parser.add_argument("--shared-prefix-cache", action="store_true",
                        help="tenants reuse each other's cached prompt blocks (default: each tenant's own)")
    parser.add_argument("--shared-response-cache", action="store_true",
                        help="tenants share cached answers, and speculation proposes one tenant's earlier "
                             "answers to another (default: each tenant's own)")
    parser.add_argument("--speculative", default="off",
                        help="speculative decoding in each shard: off, ngram, suffix or auto (see the shard's --help)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="most tokens proposed per step")
    parser.add_argument("--tls-dir", type=Path,
                        help="certificates from `make certs`: TLS to the gateway, mutual TLS between services")
    parser.add_argument("--internal-token-file", type=Path,
                        help=f"the mesh's internal token (a file of mode 0600); default: ${TOKEN_ENV}, else a fresh "
                             "random token. Services started by hand beside the mesh need the same one")
    parser.add_argument("--insecure-internal", action="store_true",
                        help="no internal credential: the tokenizer, cache and shards serve any local caller")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the hardware computes it natively, else float32")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                        help="int8 (per channel) or int4 (groups of 32) linear weights; auto: the precision the "
                             "checkpoint was published in (Q4_1: int4) where a native kernel runs it, else none")
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache memory per shard (per worker when parallel)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float32", "int8"],
                        help="KV cache storage: auto (the model's dtype), or int8 rows with a scale per token and KV "
                             "head (1.94x the tokens in --kv-cache-mb)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="Ray workers per layer in each shard")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="pipeline stages in each shard")
    parser.add_argument("--chat-template", help="a Jinja chat template to use instead of the model's (e.g. one "
                        "that renders tools)")
    parser.add_argument("--tool-call-format", choices=["auto", *TOOL_FORMATS], default="auto",
                        help="the tool call format the model writes and the gateway parses (auto: the chat "
                             "template's, else the model family's)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    name = Path(args.model).stem if args.model.endswith(".gguf") else Path(args.model).name
    if args.model.endswith(".gguf") and Path(args.model).is_file():
        args.model = str(open_model_file(args.model, parser))
    if not (Path(args.model) / "config.json").exists():
        parser.error(f"no model at {args.model}: run `make model` first")
    if args.internal_token_file and (args.tls_dir or args.insecure_internal):
        parser.error("--internal-token-file is for a mesh without --tls-dir or --insecure-internal (with --tls-dir "
                     "the client certificates are the credential)")
    try:
        token = read_token_file(args.internal_token_file) if args.internal_token_file else os.environ.get(TOKEN_ENV)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if args.insecure_internal:
        print("[launcher] warning: internal calls are not authenticated (--insecure-internal): any local process can "
              "call the tokenizer, cache and shards, bypassing the gateway's keys, limits and audit",
              file=sys.stderr, flush=True)
    plan = plan_mesh(args.model, args.shards, args.host, args.gateway_port, tls_dir=args.tls_dir,
                     internal_token=(token or "").strip() or None, insecure_internal=args.insecure_internal,
                     shard_args=["--dtype", args.dtype, "--kv-cache-mb", str(args.kv_cache_mb),
                                 "--kv-cache-dtype", args.kv_cache_dtype,
                                 "--tensor-parallel-size", str(args.tensor_parallel_size),
                                 "--pipeline-parallel-size", str(args.pipeline_parallel_size),
                                 "--quantization", args.quantization, "--speculative", args.speculative,
                                 "--num-speculative-tokens", str(args.num_speculative_tokens)],
                     tokenizer_args=[*(["--chat-template", args.chat_template] if args.chat_template else []),
                                     "--tool-call-format", args.tool_call_format],
                     gateway_args=[*(["--http-listen", f"{args.host}:{args.http_port}"] if args.http_port else []),
                                   *(["--api-keys-file", args.api_keys_file] if args.api_keys_file else []),
                                   *(["--shared-prefix-cache"] if args.shared_prefix_cache else []),
                                   *(["--shared-response-cache"] if args.shared_response_cache else []),
                                   "--model-name", name])
    mesh = Mesh(plan)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"[launcher] starting tokenizer, cache, {args.shards} shard(s), gateway ...", flush=True)
    try:
        mesh.start(args.timeout)
    except ServiceFailed as exc:
        print(f"[launcher] the mesh failed to start:\n{exc}", file=sys.stderr)
        sys.exit(1)
    http = (f"\nOpenAI-compatible HTTP API: http://{args.host}:{args.http_port}/v1 (e.g. the openai package's\n"
            f"OpenAI(base_url=..., api_key=...).chat.completions.create(model=\"{name}\", ...))"
            if args.http_port else "")
    print(USAGE.format(model=name, gateway=mesh.gateway_address, shards=args.shards,
                       s="" if args.shards == 1 else "s", metrics=plan.gateway.metrics_port, http=http,
                       internal=INTERNAL["insecure" if args.insecure_internal else "tls" if args.tls_dir else "token"]),
          flush=True)
    supervise(mesh, stop)
    print("[launcher] stopping (draining in-flight requests)", flush=True)
    mesh.stop()


def supervise(mesh: Mesh, stop: threading.Event, max_start_failures: int = 5, first_backoff_s: float = 1.0,
              max_backoff_s: float = 30.0, poll_s: float = 0.5) -> None:
    """Until `stop` is set: restart any service that exits, after a backoff that doubles while it keeps
    failing (as Kubernetes would), and log each restart. Returns early, to stop the mesh, when one
    service fails to come back healthy max_start_failures times in a row."""
    failures: dict[str, int] = {}
    planned = {spec.name for spec in [mesh.plan.gateway, *mesh.plan.backends]}
    while not stop.is_set():
        for name, proc in list(mesh.processes.items()):
            if name not in planned or proc.poll() is None or stop.is_set():
                continue
            backoff = min(max_backoff_s, first_backoff_s * 2 ** failures.get(name, 0))
            print(f"[launcher] {name} exited with code {proc.returncode}; restarting it in {backoff:g}s",
                  file=sys.stderr, flush=True)
            if stop.wait(backoff):
                return
            try:
                mesh.restart(name)
            except ServiceFailed as exc:
                failures[name] = failures.get(name, 0) + 1
                print(f"[launcher] {name} did not come back ({failures[name]} of {max_start_failures}): {exc}",
                      file=sys.stderr, flush=True)
                if failures[name] >= max_start_failures:
                    print(f"[launcher] {name} keeps failing at start; stopping the mesh", file=sys.stderr, flush=True)
                    return
                continue
            failures.pop(name, None)
            print(f"[launcher] {name} is serving again", flush=True)
        stop.wait(poll_s)


if __name__ == "__main__":
    main()
