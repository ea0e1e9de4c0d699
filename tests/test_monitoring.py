"""A real Prometheus and Alertmanager on a live mesh: the rules and dashboard evaluated on what the
services export, exemplars that lead to exported traces, and a replica alert delivered to a webhook.

One mesh (two shard replicas of a tiny model behind the real tokenizer) and one monitoring pair serve
every test of the module, in order: idle first, then an overload, then the rest; the replica test runs
last, as it kills a shard. Intervals are a second (the rules' `for` durations too), so alerts fire and
resolve within seconds.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.launcher import Mesh, free_port, plan_mesh
from services.monitor import RULES, Intervals, Monitor, binaries, mesh_targets
from services.trace_view import load_spans

from .alert_webhook import AlertWebhook
from .conftest import free_ports, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    binaries() is None, reason="prometheus and prometheus-alertmanager are not installed "
                               "(apt-get install -y prometheus prometheus-alertmanager)")]
DASHBOARD = RULES.parents[1] / "dashboards" / "llm-mesh.json"
SCRAPE_S = 1
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), at a 15 s $__interval.
RATE_INTERVAL = f"{max(15 + SCRAPE_S, 4 * SCRAPE_S)}s"
TTFT_THRESHOLD = "0.1"
MAX_RUNNING = 2  # sequences per shard step: a burst past it queues, as in an overload


def fast_rules(path) -> None:
    """The chart's rules with every alert's `for` at a second: the same expressions, sooner. The TTFT
    threshold is set as the chart's values would set it, to what a queue of a few requests exceeds."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "1s"
            if rule.get("record") == "llmmesh:slo_threshold:seconds" and rule["labels"]["slo"] == "ttft":
                rule["labels"]["le"], rule["expr"] = TTFT_THRESHOLD, f"vector({TTFT_THRESHOLD})"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))


@pytest.fixture(scope="module")
def webhook():
    receiver = AlertWebhook().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def monitored(real_model_dir, vocab_sized_tiny_model, tmp_path_factory, webhook):
    """(mesh, monitor, gateway stub)."""
    root = tmp_path_factory.mktemp("monitored")
    ports = free_ports(10)
    plan = plan_mesh(str(real_model_dir), shards=2, gateway_port=ports[0], ports=ports[1:5], metrics_ports=ports[5:9],
                     gateway_metrics_port=ports[9], shard_args=["--kv-cache-mb", "64", "--max-running", str(MAX_RUNNING)])
    for shard in plan.shards:
        shard.args[shard.args.index("--model") + 1] = str(vocab_sized_tiny_model)
    rules = root / "rules.yaml"
    fast_rules(rules)
    env = {"LLMMESH_TRACE_DIR": str(root / "traces"), "LLMMESH_LOG_FORMAT": "json"}
    with Mesh(plan, env=env, log_dir=root / "logs") as mesh:
        mesh.start(timeout=120)
        mesh.trace_dir = root / "traces"
        monitor = Monitor(root / "monitor", mesh_targets(plan), [rules], free_port(), free_port(),
                          Intervals(f"{SCRAPE_S}s", "1s", group_wait="1s", group_interval="1s", repeat="1h"),
                          webhook.url).start()
        try:
            with grpc.insecure_channel(mesh.gateway_address) as channel:
                yield mesh, monitor, gateway_pb2_grpc.GatewayStub(channel)
        finally:
            monitor.stop()


def _ask(stub, prompt: str, max_tokens: int = 12, **sampling) -> list:
    request = gateway_pb2.GenerateRequest(prompt=prompt,
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling))
    return list(stub.GenerateStream(request, timeout=60))


def _load(stub) -> None:
    """Streams side by side, a repeated greedy prompt (a response-cache hit) and two refusals that
    are the caller's fault."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _ask(stub, f"Tell me about monitoring, take {i}", temperature=0.7), range(16)))
    for _ in range(2):
        _ask(stub, "The same question, twice")
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            _ask(stub, "Too hot", temperature=-1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _alert_rules(monitor) -> list[dict]:
    return [r for g in monitor.api("rules")["groups"] for r in g["rules"] if r["type"] == "alerting"]


def test_an_idle_mesh_fires_nothing(monitored):
    _mesh, monitor, _ = monitored
    assert wait_for(lambda: monitor.query("count(up == 1) == 5"), timeout=30), monitor.query("up")
    assert wait_for(lambda: monitor.query('count(llmmesh_backend_up == 1) == 4'), timeout=30)
    all_up = time.time()

    def evaluated_since_all_up():
        groups = monitor.api("rules")["groups"]
        return all(g["lastEvaluation"] and _unix(g["lastEvaluation"]) > all_up + 2 for g in groups)

    assert wait_for(evaluated_since_all_up, timeout=30)
    assert [(r["name"], r["state"]) for r in _alert_rules(monitor) if r["state"] != "inactive"] == []


def test_an_overload_burns_the_ttft_budget(monitored):
    """Six times the requests the shards batch at once, each long enough that those queued behind
    wait past the threshold: more than 14.4 times the budget's share, over both windows."""
    _mesh, monitor, stub = monitored
    firing = 'ALERTS{alertname="LLMMeshTimeToFirstTokenBudgetBurnFast", alertstate="firing"}'
    assert not monitor.query(firing)  # the first requests of the module
    streams = 6 * 2 * MAX_RUNNING
    with ThreadPoolExecutor(streams) as pool:
        answers = list(pool.map(lambda i: _ask(stub, f"Overload {i}", max_tokens=64, ignore_eos=True), range(streams)))
    assert all(a[-1].finish_reason for a in answers)
    assert wait_for(lambda: monitor.query(firing), timeout=30), monitor.query("llmmesh:ttft_over_threshold:ratio_rate5m")


def test_every_dashboard_expression_and_recording_rule_returns_data(monitored):
    mesh, monitor, stub = monitored
    _load(stub)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"].replace("$__rate_interval", RATE_INTERVAL) for p in dashboard["panels"] for t in p["targets"]]
    records = sorted({r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                      if "record" in r})
    assert exprs and records

    def empty():
        return [e for e in [*exprs, *records] if not monitor.query(e)]

    assert wait_for(lambda: not empty(), timeout=30), empty()
    # rate() counts no increase before a series' first sample: one more request, now that all are scraped.
    _ask(stub, "And one after the first scrape")
    slis = {r: f"llmmesh:{r}:ratio_rate5m" for r in ("requests_server_errors", "ttft_over_threshold", "itl_over_threshold")}

    def values():
        found = {r: float(monitor.query(e)[0]["value"][1]) for r, e in slis.items()}
        return found if all(v == v for v in found.values()) else None  # NaN until a rate moves

    found = wait_for(values, timeout=30)
    assert found, {r: monitor.query(e) for r, e in slis.items()}
    # The caller's INVALID_ARGUMENTs spend none of the availability budget; the latency SLIs found their bucket.
    assert found["requests_server_errors"] == 0.0
    assert 0.0 <= found["ttft_over_threshold"] <= 1.0 and 0.0 <= found["itl_over_threshold"] <= 1.0


def test_exemplars_lead_to_exported_traces(monitored):
    mesh, monitor, stub = monitored
    _ask(stub, "One more, for its trace")
    metrics = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds")

    def trace_ids():
        found = {}
        for m in metrics:
            data = monitor.api("query_exemplars", query=f"llmmesh_{m}_bucket", start=time.time() - 600, end=time.time())
            found[m] = {e["labels"]["trace_id"] for s in data for e in s["exemplars"]}
        return found if all(found.values()) else None

    found = wait_for(trace_ids, timeout=30)
    assert found, "Prometheus stored no exemplars"
    exported = {s["context"]["trace_id"].removeprefix("0x") for s in load_spans(mesh.trace_dir)
                if s["name"] == "/llmmesh.v1.Gateway/GenerateStream"}
    for metric, ids in found.items():
        assert ids <= exported, (metric, ids - exported)
    # Exemplars only in the OpenMetrics exposition, and that only when asked for.
    url = f"http://127.0.0.1:{mesh.plan.gateway.metrics_port}/metrics"
    with urllib.request.urlopen(urllib.request.Request(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}), timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert '# {trace_id="' in reply.read().decode()
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain") and "trace_id" not in reply.read().decode()


def test_a_killed_shard_pages_through_alertmanager_and_resolves(monitored, webhook):
    mesh, monitor, stub = monitored
    lost = mesh.plan.shards[1]
    mesh.kill(lost.name)
    assert len(_ask(stub, "Still served by the other replica")) > 0
    alert = webhook.wait_for("LLMMeshShardReplicaNotServing", "firing", timeout=60, address=lost.listen)
    assert alert is not None, webhook.alerts()
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook_url"].endswith("/docs/runbooks.md#llmmeshshardreplicanotserving")
    assert webhook.wait_for("LLMMeshNoShardServing", "firing", timeout=0) is None  # the other one serves
    mesh.restart(lost.name, timeout=60)
    assert webhook.wait_for("LLMMeshShardReplicaNotServing", "resolved", timeout=60, address=lost.listen), \
        webhook.alerts()


def _unix(rfc3339: str) -> float:
    """Prometheus' timestamps (nanosecond fractions) as Unix seconds."""
    from datetime import datetime

    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{fraction or 0}")
