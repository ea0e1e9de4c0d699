"""Writes llm-mesh.rules.yaml: SLO recording rules, the quantiles and ratios the dashboard reads, and
the alerts (run after changing a rule: python generate.py). Prometheus loads the file as it is
(rule_files); the chart's PrometheusRule carries the same groups, with the SLO parameters group
rendered from values.

SLOs follow the SRE workbook's multi-window, multi-burn-rate method: an error ratio recorded over
seven windows, and alerts that need a long and a short window both burning the error budget fast.
The SLO parameters (objectives, latency thresholds) are series of their own, so the rules that use
them never change when a value does.
"""

from __future__ import annotations

from pathlib import Path

import yaml

RUNBOOK = "https://github.com/llm-mesh/llm-mesh/blob/main/docs/runbooks.md"
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# (severity, for, [(long window, short window, burn rate)]): page on 2 % of a 30-day budget in an hour
# or 5 % in six hours; ticket on 10 % in a day or in three.
BURNS = {"Fast": ("critical", "2m", [("1h", "5m", 14.4), ("6h", "30m", 6)]),
         "Slow": ("warning", "15m", [("1d", "2h", 3), ("3d", "6h", 1)])}
# Codes that are the mesh's fault. The caller's own (INVALID_ARGUMENT, UNAUTHENTICATED, a rate limit's
# RESOURCE_EXHAUSTED, CANCELLED, a deadline it chose) spend no budget; slowness is the latency SLOs'.
SERVER_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS"
# The chart's defaults (values.yaml metrics.rules.slo); thresholds are histogram bucket bounds.
SLO_DEFAULTS = {"availability": {"objective": 0.995},
                "ttft": {"objective": 0.99, "thresholdSeconds": "1.0"},
                "itl": {"objective": 0.99, "thresholdSeconds": "0.1"}}
LATENCY_SLIS = {"ttft": ("time_to_first_token_seconds", "time to first token"),
                "itl": ("inter_token_latency_seconds", "inter-token latency")}
QUANTILES = ("0.5", "0.9", "0.99")
QUANTILE_METRICS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                    "queue_time_seconds", "batch_size")
PARAMETERS_GROUP = "llm-mesh-slo-parameters"


def parameter_rules(slo: dict) -> list[dict]:
    """Each SLO's objective, and its latency threshold as a bucket's le label (the chart's template
    writes the same rules from values, in this order)."""
    rules = []
    for name, s in slo.items():
        rules.append({"record": "llmmesh:slo_objective:ratio", "labels": {"slo": name}, "expr": f"vector({s['objective']})"})
        if "thresholdSeconds" in s:
            rules.append({"record": "llmmesh:slo_threshold:seconds", "labels": {"slo": name, "le": s["thresholdSeconds"]},
                          "expr": f"vector({s['thresholdSeconds']})"})
    return rules


def sli_rules() -> list[dict]:
    rules = [{"record": "llmmesh:slo_error_budget:ratio", "expr": "1 - llmmesh:slo_objective:ratio"}]
    for w in WINDOWS:
        rules.append({"record": f"llmmesh:requests_server_errors:ratio_rate{w}",
                      "expr": f'(sum(rate(llmmesh_requests_total{{code=~"{SERVER_CODES}"}}[{w}])) or vector(0))'
                              f" / sum(rate(llmmesh_requests_total[{w}]))"})
        for slo, (metric, _) in LATENCY_SLIS.items():
            # The bucket whose bound is the threshold (and on(le)): the share of observations above it.
            rules.append({"record": f"llmmesh:{slo}_over_threshold:ratio_rate{w}",
                          "expr": f"1 - sum(rate(llmmesh_{metric}_bucket[{w}]) and on(le) "
                                  f'llmmesh:slo_threshold:seconds{{slo="{slo}"}}) / '
                                  f"sum(rate(llmmesh_{metric}_count[{w}]))"})
    return rules


def dashboard_rules() -> list[dict]:
    rules = [{"record": f"llmmesh:{m}:quantile_rate5m", "labels": {"quantile": q},
              "expr": f"histogram_quantile({q}, sum by (le) (rate(llmmesh_{m}_bucket[5m])))"}
             for m in QUANTILE_METRICS for q in QUANTILES]
    rules += [{"record": f"instance:llmmesh_queue_time_seconds:p90_rate{w}",
               "expr": f"histogram_quantile(0.9, sum by (instance, le) (rate(llmmesh_queue_time_seconds_bucket[{w}])))"}
              for w in ("5m", "1h")]
    rules += [
        {"record": "llmmesh:prefix_cache_hit:ratio_rate5m",
         "expr": "sum(rate(llmmesh_prefix_cache_hits_total[5m])) / sum(rate(llmmesh_prefix_cache_queries_total[5m]))"},
        {"record": "llmmesh:response_cache_hit:ratio_rate5m",
         "expr": "sum(rate(llmmesh_cache_hits_total[5m])) / sum(rate(llmmesh_cache_queries_total[5m]))"},
    ]
    return rules


def alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str, **labels) -> dict:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity, **labels},
            "annotations": {"summary": summary, "description": description,
                            "runbook_url": f"{RUNBOOK}#{name.lower()}"}}


def burn_alerts() -> list[dict]:
    slis = {"Availability": ("availability", "requests_server_errors", "requests ending in a server-side error"),
            "TimeToFirstToken": ("ttft", "ttft_over_threshold", "requests over the time-to-first-token threshold"),
            "InterTokenLatency": ("itl", "itl_over_threshold", "token gaps over the inter-token latency threshold")}
    out = []
    for sli_name, (slo, record, what) in slis.items():
        budget = f'llmmesh:slo_error_budget:ratio{{slo="{slo}"}}'
        for speed, (severity, for_, pairs) in BURNS.items():
            expr = "\nor\n".join(
                f"(llmmesh:{record}:ratio_rate{long} > on() ({rate} * {budget})\n"
                f" and llmmesh:{record}:ratio_rate{short} > on() ({rate} * {budget}))"
                for long, short, rate in pairs)
            out.append(alert(
                f"LLMMesh{sli_name}BudgetBurn{speed}", expr, for_, severity,
                f"The {slo} SLO's error budget burns {'fast' if speed == 'Fast' else 'steadily'}",
                f"{{{{ $value | humanizePercentage }}}} of {what} over the long window; at this rate the 30-day "
                f"budget lasts {'days' if speed == 'Fast' else 'weeks'}, not the month.", slo=slo))
    return out


def service_alerts() -> list[dict]:
    up = "llmmesh_backend_up"
    return [
        alert("LLMMeshShardReplicaNotServing", f'max by (address) ({up}{{backend="shard"}}) == 0', "1m", "warning",
              "Shard replica {{ $labels.address }} is down or not serving",
              "No gateway has seen {{ $labels.address }} report SERVING for a minute; requests go to the other "
              "replicas, with less capacity."),
        alert("LLMMeshNoShardServing", f'sum(max by (address) ({up}{{backend="shard"}})) == 0', "1m", "critical",
              "No shard replica is serving", "Every model shard replica is down or not serving: every request fails "
              "UNAVAILABLE."),
        alert("LLMMeshTokenizerUnreachable", f'max by (address) ({up}{{backend="tokenizer"}}) == 0', "1m", "critical",
              "Tokenizer {{ $labels.address }} is unreachable",
              "No gateway's health check of tokenizer {{ $labels.address }} has passed for a minute; with no "
              "tokenizer replica left the gateways stop serving."),
        alert("LLMMeshCacheUnreachable", f'max by (address) ({up}{{backend="cache"}}) == 0', "2m", "warning",
              "Cache {{ $labels.address }} is unreachable",
              "No gateway's health check of cache {{ $labels.address }} has passed for two minutes; requests are "
              "served without its response cache and KV prefix blocks, so prefills cost more."),
        alert("LLMMeshKVCacheNearFull",
              "llmmesh_kv_blocks_used_ratio > 0.9 and on(instance) increase(llmmesh_preemptions_total[5m]) > 0",
              "5m", "warning", "Shard {{ $labels.instance }} is out of KV blocks and preempting",
              "{{ $value | humanizePercentage }} of the shard's KV blocks are in use and it preempts sequences to "
              "make room: their work is recomputed, and latency climbs."),
        alert("LLMMeshQueueTimeRising",
              "instance:llmmesh_queue_time_seconds:p90_rate5m > 1\n"
              "and instance:llmmesh_queue_time_seconds:p90_rate5m > 2 * instance:llmmesh_queue_time_seconds:p90_rate1h",
              "10m", "warning", "Queue time rises on shard {{ $labels.instance }}",
              "The 90th percentile of time waiting for a batch slot is {{ $value | humanizeDuration }}, over a "
              "second and twice the last hour's: demand outgrows the shard."),
        alert("LLMMeshStoreErrors", "sum by (instance) (rate(llmmesh_store_errors_total[5m])) > 0", "5m", "warning",
              "Gateway {{ $labels.instance }} cannot reach its conversation store",
              "Store transactions fail ({{ $value | humanize }}/s): requests that store or continue a conversation "
              "fail UNAVAILABLE."),
        alert("LLMMeshTenantRateLimitFlood", "sum by (tenant) (rate(llmmesh_rate_limited_requests_total[5m])) > 1",
              "10m", "info", "Tenant {{ $labels.tenant }} keeps hitting its rate limit",
              "{{ $value | humanize }} requests/s of tenant {{ $labels.tenant }} are refused by the rate limit: a "
              "client retrying without back-off, or a tenant whose limit is too low."),
    ]


def rules_file(slo: dict | None = None) -> dict:
    return {"groups": [
        {"name": PARAMETERS_GROUP, "rules": parameter_rules(slo or SLO_DEFAULTS)},
        {"name": "llm-mesh-slo", "rules": sli_rules()},
        {"name": "llm-mesh-dashboard", "rules": dashboard_rules()},
        {"name": "llm-mesh-alerts", "rules": burn_alerts() + service_alerts()},
    ]}


def alert_names() -> list[str]:
    return [r["alert"] for r in burn_alerts() + service_alerts()]


class _Literal(str):
    pass


def _dump(data: dict) -> str:
    # Multi-line expressions as literal blocks, as people write them.
    yaml.add_representer(_Literal, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|"))

    def literal(node):
        if isinstance(node, dict):
            return {k: literal(v) for k, v in node.items()}
        if isinstance(node, list):
            return [literal(v) for v in node]
        return _Literal(node) if isinstance(node, str) and "\n" in node else node

    return yaml.dump(literal(data), sort_keys=False, width=120)


if __name__ == "__main__":
    out = Path(__file__).with_name("llm-mesh.rules.yaml")
    out.write_text("# Generated by generate.py: edit that, then run it.\n" + _dump(rules_file()))
    print(f"wrote {out}")
