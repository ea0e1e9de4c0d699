"""Writes llm-mesh.json, the Grafana dashboard (run after changing a panel: python generate.py)."""

import json
from pathlib import Path

P = "llmmesh_"
R = "llmmesh:"  # recorded series (rules/llm-mesh.rules.yaml)


def q(expr: str, legend: str, **extra) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}, **extra}


def quantiles(metric: str) -> list[dict]:
    """p50 / p90 / p99 from the recording rules (rules/llm-mesh.rules.yaml), one series per quantile."""
    return [q(f"{R}{metric}:quantile_rate5m", "p{{quantile}}")]


def exemplars(metric: str, legend: str) -> dict:
    """A p99 on the raw buckets: exemplars belong to them, and each links to its request's trace
    (the Prometheus data source's exemplarTraceIdDestinations, trace_id)."""
    return q(f"histogram_quantile(0.99, sum by (le) (rate({P}{metric}_bucket[$__rate_interval])))", legend,
             exemplar=True)


def burn(slo: str, record: str) -> dict:
    return q(f'{R}{record}:ratio_rate1h / on() {R}slo_error_budget:ratio{{slo="{slo}"}}', slo)


PANELS = [
    ("Time to first token", "s", quantiles("time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("inter_token_latency_seconds")),
    ("End-to-end latency", "s", quantiles("e2e_request_latency_seconds")),
    ("Queue time (shard)", "s", quantiles("queue_time_seconds")),
    ("Output tokens / s", "short", [q(f"sum(rate({P}generation_tokens_total[$__rate_interval]))", "tokens/s")]),
    ("Requests / s by status", "reqps",
     [q(f"sum by (code) (rate({P}requests_total[$__rate_interval]))", "{{code}}")]),
    ("Errors / s", "reqps",
     [q(f'sum by (code) (rate({P}requests_total{{code!="OK"}}[$__rate_interval]))', "{{code}}")]),
    ("Running / waiting requests", "short",
     [q(f"sum by (instance) ({P}requests_running)", "running {{instance}}"),
      q(f"sum by (instance) ({P}requests_waiting)", "waiting {{instance}}")]),
    ("Batch size (sequences per step)", "short", quantiles("batch_size")),
    ("KV blocks in use", "percentunit", [q(f"{P}kv_blocks_used_ratio", "{{instance}}")]),
    ("Prefix cache hit ratio (tokens)", "percentunit", [q(f"{R}prefix_cache_hit:ratio_rate5m", "hit ratio")]),
    ("Response cache hit ratio", "percentunit", [q(f"{R}response_cache_hit:ratio_rate5m", "hit ratio")]),
    ("Response cache bytes", "bytes", [q(f"{P}cache_bytes", "{{instance}}")]),
    ("Preemptions / s", "short", [q(f"sum(rate({P}preemptions_total[$__rate_interval]))", "preemptions")]),
    ("Error budget burn rate (1h; 1 spends it in 30 days)", "short",
     [burn("availability", "requests_server_errors"), burn("ttft", "ttft_over_threshold"),
      burn("itl", "itl_over_threshold")]),
    ("Backends up (as the gateways see them)", "short",
     [q(f"max by (backend, address) ({P}backend_up)", "{{backend}} {{address}}")]),
    ("Slow requests to their traces (p99 with exemplars)", "s",
     [exemplars("time_to_first_token_seconds", "time to first token"),
      exemplars("inter_token_latency_seconds", "inter-token latency"),
      exemplars("e2e_request_latency_seconds", "end-to-end")]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "targets": targets,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
        })
    return {
        "title": "llm-mesh", "uid": "llm-mesh", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["llm-mesh"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("llm-mesh.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
