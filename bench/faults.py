"""What clients see when a service fails under load: for each fault, 16 streaming clients run for a
window while one service is killed (then restarted) or hung (SIGSTOP, then SIGCONT).

Printed per fault: streams completed, failed (by gRPC status; a client sends its next request as
soon as one fails), how long a failed request took to fail (median; a dependency known down should
refuse at once rather than after its timeout), and the recovery time: from the moment the service is back (restarted and
healthy, or continued) to the first token of the first request started after that moment which
completes.

    .venv/bin/python bench/faults.py [--dtype bfloat16 --quantization int4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.launcher import Mesh, free_port, plan_mesh  # noqa: E402

FAULTS = {  # name: (service, kind)
    "shard kill": ("shard-0", "kill"),
    "tokenizer kill": ("tokenizer", "kill"),
    "tokenizer hang": ("tokenizer", "hang"),
    "cache kill": ("cache", "kill"),
}


async def client(stub, stop_at: float, results: list, max_tokens: int) -> None:
    """Requests one after another until stop_at: (start, first token, status, end) for each."""
    i = 0
    while time.monotonic() < stop_at:
        request = gateway_pb2.GenerateRequest(prompt=f"Write about rivers, part {i}",
                                              sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
        start, first = time.monotonic(), None
        try:
            async for chunk in stub.GenerateStream(request, timeout=60):
                if first is None and chunk.token_ids:
                    first = time.monotonic()
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        results.append((start, first, status, time.monotonic()))
        i += 1


def inject(mesh: Mesh, service: str, kind: str, outage_s: float, healed: dict) -> None:
    """Runs in a thread: the fault, its outage, then the heal; healed["at"] is when it is back."""
    if kind == "kill":
        mesh.kill(service)
        time.sleep(outage_s)  # the outage itself: this is the fault being measured, not a wait for an event
        mesh.restart(service)  # returns once the service reports SERVING
    else:
        pid = mesh.processes[service].pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(outage_s)
        os.kill(pid, signal.SIGCONT)
    healed["at"] = time.monotonic()


async def run_fault(mesh: Mesh, name: str, streams: int, window_s: float, fault_at_s: float, outage_s: float,
                    max_tokens: int) -> dict:
    service, kind = FAULTS[name]
    results: list = []
    healed: dict = {}
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stop_at = time.monotonic() + window_s
        clients = [asyncio.create_task(client(stub, stop_at, results, max_tokens)) for _ in range(streams)]
        await asyncio.sleep(fault_at_s)
        fault = threading.Thread(target=inject, args=(mesh, service, kind, outage_s, healed))
        fault.start()
        await asyncio.gather(*clients)
        await asyncio.to_thread(fault.join)
    statuses = Counter(status for _, _, status, _ in results)
    back = healed.get("at")
    after = sorted(first for start, first, status, _ in results if back is not None and start >= back and status == "OK")
    failing = sorted(end - start for start, _, status, end in results if status != "OK")
    return {"fault": name, "completed": statuses.pop("OK", 0), "failed": dict(statuses),
            "fail_median_s": failing[len(failing) // 2] if failing else None,
            "recovery_s": (after[0] - back) if after else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--window", type=float, default=20.0, help="seconds of load per fault")
    parser.add_argument("--fault-at", type=float, default=4.0, help="seconds into the window")
    parser.add_argument("--outage", type=float, default=4.0, help="seconds a killed service stays down / a hang lasts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    ports = [free_port() for _ in range(5)]
    shard_args = ["--dtype", args.dtype, "--kv-cache-mb", "512",
                  *(["--quantization", args.quantization] if args.quantization != "none" else [])]
    plan = plan_mesh(str(args.model), 2, gateway_port=ports[0], ports=ports[1:5], metrics_ports=[0, 0, 0, 0],
                     gateway_metrics_port=0, shard_args=shard_args, gateway_args=["--no-response-cache"])
    rows = []
    with Mesh(plan, log_dir=Path("/tmp/llmmesh-faults-logs")) as mesh:
        mesh.start()
        for name in args.faults.split(","):
            rows.append(asyncio.run(run_fault(mesh, name, args.streams, args.window, args.fault_at, args.outage,
                                              args.max_tokens)))
            print(f"  measured {name}", flush=True)
    print(f"\n{args.streams} streams, {args.window:g}s per fault, fault at {args.fault_at:g}s, outage {args.outage:g}s; "
          f"{args.dtype}{'' if args.quantization == 'none' else ' + ' + args.quantization}, 2 shard replicas\n")
    print(f"{'fault':16} {'completed':>9}  {'recovery':>9}  {'fails in':>9}  failed (by status)")
    for r in rows:
        recovery = f"{r['recovery_s']:.2f}s" if r["recovery_s"] is not None else "never"
        fails_in = f"{r['fail_median_s'] * 1000:.0f}ms" if r["fail_median_s"] is not None else "-"
        failed = ", ".join(f"{k} {v}" for k, v in sorted(r["failed"].items())) or "none"
        print(f"{r['fault']:16} {r['completed']:9d}  {recovery:>9}  {fails_in:>9}  {failed}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
