"""Show one request's trace as a tree, from the JSON-lines span files the services write under
LLMMESH_TRACE_DIR.

    python -m services.trace_view           # start the mesh, send one request, print its trace
    python -m services.trace_view --dir D [--trace-id ID]   # print a trace already on disk
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def complete_lines(path: Path) -> list[str]:
    """The lines of a file another process is still appending to, without a half-written last one."""
    return path.read_text(errors="replace").split("\n")[:-1]


def load_spans(trace_dir: Path) -> list[dict]:
    spans = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        for line in complete_lines(path):
            if line.strip():
                spans.append(json.loads(line))
    return spans


def _ns(ts: str) -> int:
    # "2026-11-24T12:00:00.123456Z" (the SDK's ISO form)
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1e9)


def format_tree(spans: list[dict], trace_id: str) -> str:
    """Indented span tree of one trace: offset from the root's start, duration, service, name."""
    trace_id = trace_id if trace_id.startswith("0x") else "0x" + trace_id
    mine = [s for s in spans if s["context"]["trace_id"] == trace_id]
    if not mine:
        return f"no spans for trace {trace_id}"
    ids = {s["context"]["span_id"] for s in mine}
    children: dict[str | None, list[dict]] = {}
    for s in mine:
        parent = s.get("parent_id") if s.get("parent_id") in ids else None
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: _ns(s["start_time"]))
    t0 = min(_ns(s["start_time"]) for s in mine)
    lines = [f"trace {trace_id[2:]}  ({len(mine)} spans)"]

    def walk(span: dict, depth: int) -> None:
        start, end = _ns(span["start_time"]), _ns(span["end_time"])
        service = span["resource"]["attributes"].get("service.name", "?").removeprefix("llmmesh-")
        attrs = {k.removeprefix("llmmesh."): v for k, v in span["attributes"].items() if k.startswith("llmmesh.")}
        note = " ".join(f"{k}={v}" for k, v in attrs.items())
        lines.append(f"{(start - t0) / 1e6:9.1f}ms {(end - start) / 1e6:9.1f}ms  {'  ' * depth}{span['name']}"
                     f"  [{service}]{'  ' + note if note else ''}")
        for child in children.get(span["context"]["span_id"], []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return "\n".join(lines)


def demo(model: str, question: str) -> None:
    import grpc

    from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
    from services.launcher import Mesh, free_port, plan_mesh

    trace_dir = Path(tempfile.mkdtemp(prefix="llmmesh-trace-"))
    ports = [free_port() for _ in range(7)]
    plan = plan_mesh(model, 1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, 0], gateway_metrics_port=0)
    print(f"starting the mesh (spans go to {trace_dir}) ...", flush=True)
    with Mesh(plan, env={"LLMMESH_TRACE_DIR": str(trace_dir)}, log_dir=trace_dir / "logs") as mesh:
        mesh.start()
        request_id = f"trace-demo-{int(time.time())}"
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GenerateRequest(
                request_id=request_id, messages=[common_pb2.ChatMessage(role="user", content=question)],
                sampling=common_pb2.SamplingParams(max_tokens=32))
            text = "".join(c.text for c in stub.GenerateStream(request, timeout=120))
        print(f"answer: {text!r}\n", flush=True)
    # The services flushed their spans on exit.
    spans = load_spans(trace_dir)
    root = next(s for s in spans if s["attributes"].get("llmmesh.request_id") == request_id)
    print(format_tree(spans, root["context"]["trace_id"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="read spans from here instead of running a request")
    parser.add_argument("--trace-id", help="with --dir: which trace (default: the latest root span's)")
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--question", default="What is the capital of France?")
    args = parser.parse_args()
    if args.dir is None:
        demo(args.model, args.question)
        return
    spans = load_spans(args.dir)
    if not spans:
        sys.exit(f"no spans under {args.dir}")
    trace_id = args.trace_id or max((s for s in spans if not s.get("parent_id")), key=lambda s: s["start_time"])["context"]["trace_id"]
    print(format_tree(spans, trace_id))


if __name__ == "__main__":
    main()
