"""What an SRE reads: metrics that move with traffic, logs that name their trace, traces that
continue a caller's. Runs against the shared mesh (JSON logs, span files)."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2
from services.trace_view import complete_lines, format_tree, load_spans

from .conftest import sample_value, scrape_metrics, wait_for

pytestmark = pytest.mark.e2e


def test_metrics_move_with_requests(mesh, gateway):
    n = 3
    gw_port = mesh.plan.gateway.metrics_port
    shard_ports = [s.metrics_port for s in mesh.plan.shards]
    before, shards_before = scrape_metrics(gw_port), [scrape_metrics(p) for p in shard_ports]
    completion_tokens = 0
    for i in range(n):
        prompt = f"Metrics probe {time.time_ns()} number {i}:"
        reply = gateway.Generate(gateway_pb2.GenerateRequest(prompt=prompt,
                                                             sampling=common_pb2.SamplingParams(max_tokens=4)),
                                 timeout=60)
        completion_tokens += reply.usage.completion_tokens
    after, shards_after = scrape_metrics(gw_port), [scrape_metrics(p) for p in shard_ports]

    def moved(name, samples_before=before, samples_after=after, **labels):
        return sample_value(samples_after, name, **labels) - sample_value(samples_before, name, **labels)

    assert moved("llmmesh_requests_total", method="Generate", code="OK") == n
    assert moved("llmmesh_time_to_first_token_seconds_count") == n
    assert moved("llmmesh_e2e_request_latency_seconds_count") == n
    assert moved("llmmesh_generation_tokens_total") == completion_tokens > 0
    assert moved("llmmesh_inter_token_latency_seconds_count") > 0
    # The messages behind them: one Encode each, one shard call each with a message per step (one or
    # more tokens), a response-cache lookup and store each; nothing per token to the tokenizer.
    messages = {(peer, d): moved("llmmesh_internal_messages_total", peer=peer, direction=d)
                for peer in ("tokenizer", "shard", "cache") for d in ("sent", "received")}
    assert messages["tokenizer", "sent"] == messages["tokenizer", "received"] == n
    assert messages["shard", "sent"] == n and n <= messages["shard", "received"] <= completion_tokens
    assert messages["cache", "sent"] == messages["cache", "received"] == 2 * n
    queued = sum(moved("llmmesh_queue_time_seconds_count", b, a) for b, a in zip(shards_before, shards_after))
    assert queued == n
    steps = sum(moved("llmmesh_batch_size_count", b, a) for b, a in zip(shards_before, shards_after))
    assert steps >= n * 4 / 2  # several decode steps per request, whatever the batching
    for samples in shards_after:
        assert ("llmmesh_kv_blocks_used_ratio", ()) in samples
        assert sample_value(samples, "llmmesh_prefix_cache_queries_total") >= sample_value(samples, "llmmesh_prefix_cache_hits_total")


def test_every_service_exposes_parseable_metrics(mesh):
    for spec in [mesh.plan.gateway, *mesh.plan.backends]:
        assert scrape_metrics(spec.metrics_port), spec.name


def _audit_lines(mesh, request_id: str) -> list[dict]:
    lines = []
    for line in complete_lines(mesh.log_dir / "gateway.log"):
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "llmmesh.audit" and entry.get("request_id") == request_id:
                lines.append(entry)
    return lines


def test_audit_line_names_the_request_and_its_trace(mesh, gateway):
    request_id = f"audit-{time.time_ns()}"
    secret = "my secret prompt text"
    gateway.Generate(gateway_pb2.GenerateRequest(prompt=secret, request_id=request_id, priority=2,
                                                 sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=60)
    lines = wait_for(lambda: _audit_lines(mesh, request_id))
    assert len(lines) == 1
    audit = lines[0]
    assert audit["status"] == "OK" and audit["tenant"] == "anonymous" and audit["front"] == "grpc"
    assert audit["priority"] == "batch"
    assert audit["prompt_tokens"] > 0 and audit["completion_tokens"] == 3
    assert secret not in json.dumps(audit)
    root = wait_for(lambda: next((s for s in load_spans(mesh.trace_dir)
                                   if s["attributes"].get("llmmesh.request_id") == request_id), None))
    assert root["context"]["trace_id"] == "0x" + audit["trace_id"]
    assert root["attributes"]["llmmesh.tenant"] == "anonymous" and root["attributes"]["llmmesh.priority"] == "batch"

    with pytest.raises(grpc.RpcError):
        gateway.Generate(gateway_pb2.GenerateRequest(prompt="", request_id=request_id + "-bad"), timeout=30)
    bad = wait_for(lambda: _audit_lines(mesh, request_id + "-bad"))
    assert bad[0]["status"] == "INVALID_ARGUMENT"


def test_a_callers_traceparent_is_continued_over_grpc(mesh, gateway):
    trace_id = f"{time.time_ns():032x}"[-32:]
    parent = "b7ad6b7169203331"
    request = gateway_pb2.GenerateRequest(prompt="Tell me about tea.", sampling=common_pb2.SamplingParams(max_tokens=3))
    gateway.Generate(request, timeout=60, metadata=[("traceparent", f"00-{trace_id}-{parent}-01")])
    wanted = {"/llmmesh.v1.Gateway/Generate", "/llmmesh.v1.Tokenizer/Encode", "/llmmesh.v1.ModelShard/Generate",
              "prefill", "decode"}

    def trace_spans():
        spans = [s for s in load_spans(mesh.trace_dir) if s["context"]["trace_id"] == "0x" + trace_id]
        return spans if wanted <= {s["name"] for s in spans} else None

    spans = wait_for(trace_spans)
    assert spans, "the mesh did not continue the caller's trace"
    root = next(s for s in spans if s["name"] == "/llmmesh.v1.Gateway/Generate")
    assert root["parent_id"] == "0x" + parent
    for s in spans:
        attrs = s["resource"]["attributes"]
        assert attrs["service.name"].startswith("llmmesh-") and attrs["service.version"] and attrs["service.instance.id"]
    tree = format_tree(load_spans(mesh.trace_dir), trace_id)
    assert "/llmmesh.v1.Gateway/Generate  [gateway]" in tree
    assert "      prefill  [model_shard]" in tree  # nested under the shard's server span


def test_dashboard_queries_name_metrics_the_services_export(mesh, gateway):
    """Every metric the Grafana dashboard plots is one some service really exposes."""
    import re
    from pathlib import Path

    request = gateway_pb2.GenerateRequest(prompt=f"Dashboard probe {time.time_ns()}",
                                          sampling=common_pb2.SamplingParams(max_tokens=2))
    for _ in range(2):  # a miss then a hit: every labelled series exists afterwards
        gateway.Generate(request, timeout=60)
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "charts/llm-mesh/dashboards/llm-mesh.json").read_text())
    used = {m for panel in dashboard["panels"] for t in panel["targets"]
            for m in re.findall(r"\b(llmmesh_[a-z0-9_]+)", t["expr"])}
    exported = set()
    for spec in [mesh.plan.gateway, *mesh.plan.backends]:
        exported |= {name for name, _ in scrape_metrics(spec.metrics_port)}
    assert used and used <= exported, used - exported


def test_one_request_is_one_trace_over_otlp(mesh, gateway, otlp_receiver):
    """The same story through a real OTLP exporter and receiver: every service, links intact."""
    trace_id = f"{time.time_ns() + 7:032x}"[-32:]
    request = gateway_pb2.GenerateRequest(prompt="Name a planet.", sampling=common_pb2.SamplingParams(max_tokens=4))
    reply = gateway.Generate(request, timeout=60, metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    services = {"llmmesh-gateway", "llmmesh-tokenizer", "llmmesh-cache", "llmmesh-model_shard"}

    def complete(spans):
        # Each process exports in its own batches: wait for the root (the gateway's server span,
        # ended last) as well as the rest.
        mine = [s for s in spans if s["trace_id"] == trace_id]
        names = {s["name"] for s in mine}
        return services <= {s["service"] for s in mine} and {"prefill", "decode", "/llmmesh.v1.Gateway/Generate",
                                                              "/llmmesh.v1.Cache/PutResponse"} <= names

    spans = [s for s in otlp_receiver.wait_for(complete, timeout=30) if s["trace_id"] == trace_id]
    assert services <= {s["service"] for s in spans}
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent_id"] not in ids]
    assert [r["name"] for r in roots] == ["/llmmesh.v1.Gateway/Generate"]
    assert roots[0]["parent_id"] == "00f067aa0ba902b7"  # the caller's span
    shard = next(s for s in spans if s["name"] == "/llmmesh.v1.ModelShard/Generate" and s["service"] == "llmmesh-model_shard")
    assert "first_token" in shard["events"]
    decode = next(s for s in spans if s["name"] == "decode")
    assert decode["attributes"]["llmmesh.completion_tokens"].int_value == reply.usage.completion_tokens > 0
