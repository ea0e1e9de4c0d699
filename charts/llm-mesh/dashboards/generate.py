"""Writes llm-mesh.json, the Grafana dashboard (run after changing a panel: python generate.py)."""

import json
from pathlib import Path

P = "llmmesh_"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}}


def quantiles(metric: str) -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le) (rate({P}{metric}_bucket[$__rate_interval])))", f"p{int(p * 100)}")
            for p in (0.5, 0.9, 0.99)]


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
    ("Prefix cache hit ratio (tokens)", "percentunit",
     [q(f"sum(rate({P}prefix_cache_hits_total[$__rate_interval])) / "
        f"sum(rate({P}prefix_cache_queries_total[$__rate_interval]))", "hit ratio")]),
    ("Response cache hit ratio", "percentunit",
     [q(f"sum(rate({P}cache_hits_total[$__rate_interval])) / sum(rate({P}cache_queries_total[$__rate_interval]))",
        "hit ratio")]),
    ("Response cache bytes", "bytes", [q(f"{P}cache_bytes", "{{instance}}")]),
    ("Preemptions / s", "short", [q(f"sum(rate({P}preemptions_total[$__rate_interval]))", "preemptions")]),
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
