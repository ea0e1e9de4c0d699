"""The SLO rules and alerts, checked by Prometheus' own promtool: the file parses, is the generator's
output, and every alert fires on synthetic series that break its condition and stays quiet on
series that come close (`promtool test rules`)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.monitor import RULES

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus)")
GW = {"instance": "gw:9400", "job": "llmmesh-gateway"}
SHARD = {"instance": "shard:9410", "job": "llmmesh-shard"}


def load_generator():
    spec = importlib.util.spec_from_file_location("rules_generate", RULES.with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ALERTS = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


def series(name: str, values: str, **labels) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires(alert: str, at: str, labels: dict, value: str = "") -> dict:
    """The alert_rule_test that expects `alert` firing at `at` with labels (beyond the rule's own),
    its annotations rendered with $value shown as `value`."""
    rule = ALERTS[alert]
    every = {**labels, **rule["labels"]}

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$value[^}]*\}\}", value, text)
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: every[m.group(1)], text)

    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": every, "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()}}]}


def quiet(alert: str, at: str) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def case(input_series: list[dict], *checks: dict) -> dict:
    return {"interval": "1m", "input_series": input_series, "alert_rule_test": list(checks)}


def requests(ok_per_min: int, code: str, per_min: int) -> list[dict]:
    return [series("llmmesh_requests_total", f"0+{ok_per_min}x40", method="Generate", code="OK", **GW),
            series("llmmesh_requests_total", f"0+{per_min}x40", method="Generate", code=code, **GW)]


def latency(metric: str, le: str, within_per_min: int, total_per_min: int) -> list[dict]:
    """A histogram with `within_per_min` of `total_per_min` observations a minute at or under `le`."""
    return [series(f"{metric}_bucket", f"0+{within_per_min}x40", le=le, **GW),
            series(f"{metric}_bucket", f"0+{total_per_min}x40", le="+Inf", **GW),
            series(f"{metric}_count", f"0+{total_per_min}x40", **GW)]


def burn_cases() -> list[dict]:
    cases = []
    for name, slo_series, calm_series in [
        # 10 % server errors burn the budget; 10 % of the caller's own errors burn none of it.
        ("Availability", requests(540, "INTERNAL", 60), requests(540, "INVALID_ARGUMENT", 60)),
        ("TimeToFirstToken", latency("llmmesh_time_to_first_token_seconds", "1.0", 50, 100),
         latency("llmmesh_time_to_first_token_seconds", "1.0", 999, 1000)),
        ("InterTokenLatency", latency("llmmesh_inter_token_latency_seconds", "0.1", 50, 100),
         latency("llmmesh_inter_token_latency_seconds", "0.1", 999, 1000)),
    ]:
        value = "10%" if name == "Availability" else "50%"
        fast, slow = f"LLMMesh{name}BudgetBurnFast", f"LLMMesh{name}BudgetBurnSlow"
        # A steady ratio reads the same over every window, full or not: minutes of series suffice.
        cases.append(case(slo_series, quiet(fast, "2m"), fires(fast, "10m", {}, value), quiet(slow, "10m"),
                          fires(slow, "25m", {}, value)))
        cases.append(case(calm_series, quiet(fast, "30m"), quiet(slow, "30m")))
    return cases


def backend(kind: str, address: str, values: str, gateway: str = "gw:9400") -> dict:
    return series("llmmesh_backend_up", values, backend=kind, address=address, instance=gateway, job="llmmesh-gateway")


def backend_cases() -> list[dict]:
    cases = []
    for kind, alert in (("shard", "LLMMeshShardReplicaNotServing"), ("tokenizer", "LLMMeshTokenizerUnreachable"),
                        ("cache", "LLMMeshCacheUnreachable")):
        down = [backend(kind, "a:1", "1 1 0x20"), backend(kind, "b:1", "1x22")]
        cases.append(case(down, quiet(alert, "1m"), fires(alert, "6m", {"address": "a:1"})))
        # One gateway cut off from a replica the other reaches: the replica is up.
        split = [backend(kind, "a:1", "0x20"), backend(kind, "a:1", "1x20", gateway="gw2:9400")]
        cases.append(case(split, quiet(alert, "6m")))
    none = [backend("shard", "a:1", "1 0x20"), backend("shard", "b:1", "1 0x20")]
    one = [backend("shard", "a:1", "1 0x20"), backend("shard", "b:1", "1x20")]
    cases.append(case(none, fires("LLMMeshNoShardServing", "5m", {}), quiet("LLMMeshShardReplicaNotServing", "0m")))
    cases.append(case(one, quiet("LLMMeshNoShardServing", "5m")))
    return cases


def queue(slow_from: int, fast_per_min: int, slow_per_min: int) -> list[dict]:
    """Queue-time buckets: fast_per_min requests a minute wait under 10 ms; from minute slow_from,
    slow_per_min more wait 1-5 s."""
    fast = f"0+{fast_per_min}x80"
    at = fast_per_min * slow_from
    slow = f"0+{fast_per_min}x{slow_from} {at + fast_per_min + slow_per_min}+{fast_per_min + slow_per_min}x{79 - slow_from}"
    metric = "llmmesh_queue_time_seconds_bucket"
    return [series(metric, fast, le="0.01", **SHARD), series(metric, fast, le="1.0", **SHARD),
            series(metric, slow, le="5.0", **SHARD), series(metric, slow, le="+Inf", **SHARD)]


def shard_cases() -> list[dict]:
    kv = "llmmesh_kv_blocks_used_ratio"
    preempted = "llmmesh_preemptions_total"
    return [
        case([series(kv, "0.95x20", **SHARD), series(preempted, "0+3x20", **SHARD)],
             quiet("LLMMeshKVCacheNearFull", "3m"), fires("LLMMeshKVCacheNearFull", "10m", SHARD, "95%")),
        # Full but not preempting (a steady batch), or preempting with room: neither is this alert.
        case([series(kv, "0.95x20", **SHARD), series(preempted, "5x20", **SHARD)], quiet("LLMMeshKVCacheNearFull", "10m")),
        case([series(kv, "0.5x20", **SHARD), series(preempted, "0+3x20", **SHARD)], quiet("LLMMeshKVCacheNearFull", "10m")),
        # An hour of short waits, then 30 % more requests that wait seconds (p90 1 + 4 * 85/150 s):
        # rising. The same mix from the start is a slow shard, not a rising queue.
        case(queue(60, 100, 30), quiet("LLMMeshQueueTimeRising", "60m"), fires("LLMMeshQueueTimeRising", "76m",
                                                              {"instance": SHARD["instance"]}, "3.267s")),
        case(queue(0, 100, 30), quiet("LLMMeshQueueTimeRising", "76m")),
    ]


def gateway_cases() -> list[dict]:
    errors = "llmmesh_store_errors_total"
    limited = "llmmesh_rate_limited_requests_total"
    return [
        case([series(errors, "0+60x20", dialect="postgresql", **GW)],
             quiet("LLMMeshStoreErrors", "4m"), fires("LLMMeshStoreErrors", "10m", {"instance": GW["instance"]}, "1")),
        case([series(errors, "3x20", dialect="postgresql", **GW)], quiet("LLMMeshStoreErrors", "10m")),
        case([series(limited, "0+300x30", tenant="acme", **GW), series(limited, "0+30x30", tenant="calm", **GW)],
             fires("LLMMeshTenantRateLimitFlood", "20m", {"tenant": "acme"}, "5")),
    ]


@pytest.fixture(scope="module")
def unit_tests() -> dict:
    return {"rule_files": [str(RULES)], "evaluation_interval": "1m",
            "tests": burn_cases() + backend_cases() + shard_cases() + gateway_cases()}


def test_the_rules_file_is_the_generators_output():
    generator = load_generator()
    assert yaml.safe_load(RULES.read_text()) == generator.rules_file(), "run charts/llm-mesh/rules/generate.py"


@needs_promtool
def test_promtool_checks_the_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_every_alert_fires_and_stays_quiet_under_promtool(unit_tests, tmp_path):
    tested = {t["alertname"] for c in unit_tests["tests"] for t in c["alert_rule_test"]}
    firing = {t["alertname"] for c in unit_tests["tests"] for t in c["alert_rule_test"] if t["exp_alerts"]}
    assert tested == firing == set(ALERTS)
    path = tmp_path / "alerts.test.yaml"
    path.write_text(yaml.safe_dump(unit_tests, sort_keys=False))
    out = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_runbook_section():
    headings = {line[3:].strip() for line in (RULES.parents[3] / "docs" / "runbooks.md").read_text().splitlines()
                if line.startswith("## ")}
    for name, rule in ALERTS.items():
        assert name in headings, f"docs/runbooks.md has no '## {name}'"
        assert rule["annotations"]["runbook_url"].endswith(f"/docs/runbooks.md#{name.lower()}")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_latency_slo_thresholds_are_bucket_bounds():
    """The chart's schema offers exactly the histograms' bucket bounds, written as their le labels."""
    import json

    from prometheus_client.utils import floatToGoString

    from services.gateway.choice_stream import ITL
    from services.gateway.server import TTFT

    schema = json.loads((RULES.parents[1] / "values.schema.json").read_text())
    slo = schema["properties"]["metrics"]["properties"]["rules"]["properties"]["slo"]["properties"]
    for key, histogram in (("ttft", TTFT), ("itl", ITL)):
        bounds = [floatToGoString(b) for b in histogram._upper_bounds if b != float("inf")]
        assert slo[key]["properties"]["thresholdSeconds"]["enum"] == bounds
    defaults = load_generator().SLO_DEFAULTS
    assert defaults["ttft"]["thresholdSeconds"] in slo["ttft"]["properties"]["thresholdSeconds"]["enum"]
