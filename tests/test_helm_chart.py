"""The Helm chart: rendered offline by Helm's own engine (helm-python-sdk), linted, and every object
validated strictly against the Kubernetes OpenAPI schemas (kubernetes-validate)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "llm-mesh"
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                ("ray.io/v1", "RayCluster")}  # CRDs: no bundled schema (a PrometheusRule's rules: promtool, below)
KEY_HASH = "a" * 64

VALUE_SETS = {
    "defaults": {},
    "gpu-tp2": {"shards": {"gpu": {"enabled": True, "count": 1}, "tensorParallelSize": 2, "dtype": "bfloat16",
                           "nodeSelector": {"nvidia.com/gpu.present": "true"},
                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
    "autoscaling": {"gateway": {"autoscaling": {"enabled": True, "maxReplicas": 6}},
                    "tokenizer": {"autoscaling": {"enabled": True}}, "cache": {"replicas": 3}},
    "tls-auth": {"tls": {"enabled": True, "existingSecret": "mesh-tls"},
                 "auth": {"enabled": True, "apiKeys": [f"acme {KEY_HASH}"]},
                 "metrics": {"serviceMonitor": {"enabled": True}},
                 "tracing": {"otlpEndpoint": "http://otel-collector.observability:4317"}},
    "conversations-postgresql": {"conversations": {"store": "postgresql", "urlSecret": {"name": "mesh-db"},
                                                   "encryptionKeySecret": {"name": "mesh-store-keys"},
                                                   "redactPersonalData": True}},
    "conversations-sqlite": {"gateway": {"replicas": 1}, "conversations": {"store": "sqlite", "sqliteClaim": "mesh-data"}},
    "rules": {"metrics": {"rules": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                    "runbookUrl": "https://wiki.example.com/llm-mesh/runbooks.md",
                                    "slo": {"ttft": {"objective": 0.95, "thresholdSeconds": "2.5"}}}}},
    "kuberay": {"shards": {"ray": {"enabled": True, "workerReplicas": 2}, "gpu": {"enabled": True},
                           "tensorParallelSize": 3, "pipelineParallelSize": 2}},
    "internal-token-secret": {"internalAuth": {"existingSecret": "mesh-internal"}},
    "insecure-internal": {"internalAuth": {"insecure": True}, "tls": {"enabled": True, "existingSecret": "mesh-tls"}},
}
SERVICES = [("Deployment", "gateway"), ("Deployment", "tokenizer"), ("StatefulSet", "cache"), ("StatefulSet", "shard")]


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(CHART)


def render(chart, values: dict) -> list[dict]:
    manifests = chart.render(values, name="prod", namespace="serving", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def test_the_chart_lints_clean():
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert problems == [], problems


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes(chart, value_set):
    docs = render(chart, VALUE_SETS[value_set])
    assert len(docs) >= 12
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_defaults_wire_the_services_together(chart):
    docs = render(chart, {})
    gateway = container(find(docs, "Deployment", "prod-llm-mesh-gateway"))
    assert "--discovery=kubernetes" in gateway["args"] and "--shard-service=prod-llm-mesh-shard" in gateway["args"]
    assert "--cache=prod-llm-mesh-cache-0.prod-llm-mesh-cache.serving.svc:50053" in gateway["args"]
    # Tokenizer pods are resolved one by one (headless) so the gateway's calls spread over them.
    assert "--tokenizer=dns:///prod-llm-mesh-tokenizer.serving.svc:50052" in gateway["args"]
    assert find(docs, "Service", "prod-llm-mesh-tokenizer")["spec"]["clusterIP"] == "None"
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051  # native gRPC probe on grpc.health.v1
    shard_set = find(docs, "StatefulSet", "prod-llm-mesh-shard")
    shard = container(shard_set)
    assert shard["readinessProbe"]["grpc"]["port"] == 50061 and shard["startupProbe"]["failureThreshold"] >= 60
    # Long enough to drain: preStop pause + the shard's own grace, which matches drainSeconds.
    assert shard_set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 135
    assert "--grace=120" in shard["args"]
    assert find(docs, "Service", "prod-llm-mesh-shard")["spec"]["clusterIP"] == "None"
    # Only the gateway's own ports are open to the world.
    policy = find(docs, "NetworkPolicy", "prod-llm-mesh-gateway-ingress")
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == {50051, 8000}
    role = find(docs, "Role", "prod-llm-mesh-discovery")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    dashboard = find(docs, "ConfigMap", "prod-llm-mesh-dashboard")
    assert json.loads(dashboard["data"]["llm-mesh.json"]) == json.loads((CHART / "dashboards" / "llm-mesh.json").read_text())
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {
        f"prod-llm-mesh-{c}" for c in ("gateway", "tokenizer", "cache", "shard")}


def test_the_kv_cache_dtype_reaches_the_shards(chart):
    assert "--kv-cache-dtype=auto" in container(find(render(chart, {}), "StatefulSet", "prod-llm-mesh-shard"))["args"]
    docs = render(chart, {"shards": {"kvCacheDtype": "int8"}})
    assert "--kv-cache-dtype=int8" in container(find(docs, "StatefulSet", "prod-llm-mesh-shard"))["args"]


def test_gpu_shards_request_a_gpu_per_tensor_parallel_rank(chart):
    docs = render(chart, VALUE_SETS["gpu-tp2"])
    shard_set = find(docs, "StatefulSet", "prod-llm-mesh-shard")
    shard = container(shard_set)
    assert shard["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--tensor-parallel-size=2" in shard["args"] and "--dtype=bfloat16" in shard["args"]
    assert shard["image"].endswith("-cuda")
    assert shard_set["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_autoscaling_hands_the_replica_count_to_the_hpa(chart):
    docs = render(chart, VALUE_SETS["autoscaling"])
    hpa = find(docs, "HorizontalPodAutoscaler", "prod-llm-mesh-gateway")
    assert hpa["spec"]["maxReplicas"] == 6
    assert "replicas" not in find(docs, "Deployment", "prod-llm-mesh-gateway")["spec"]
    cache_arg = next(a for a in container(find(docs, "Deployment", "prod-llm-mesh-gateway"))["args"] if a.startswith("--cache="))
    assert len(cache_arg.split(",")) == 3  # every cache replica, for consistent hashing


def test_tls_and_auth_reach_every_service(chart):
    docs = render(chart, VALUE_SETS["tls-auth"])
    for kind, name in [("Deployment", "gateway"), ("Deployment", "tokenizer"), ("StatefulSet", "cache"),
                       ("StatefulSet", "shard")]:
        c = container(find(docs, kind, f"prod-llm-mesh-{name}"))
        assert "--tls-cert=/etc/llm-mesh/tls/tls.crt" in c["args"]
        assert ("--tls-client-auth" in c["args"]) == (name != "gateway")  # mutual TLS inside the mesh
    secret = find(docs, "Secret", "prod-llm-mesh-api-keys")
    assert secret["stringData"]["api-keys"].split() == ["acme", KEY_HASH]
    gateway = container(find(docs, "Deployment", "prod-llm-mesh-gateway"))
    assert "--api-keys-file=/etc/llm-mesh/auth/api-keys" in gateway["args"]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert find(docs, "ServiceMonitor", "prod-llm-mesh")["spec"]["endpoints"][0]["port"] == "metrics"


def _internal_env(docs: list[dict]) -> dict[str, dict]:
    """Each service's internal-credential variables, by service."""
    names = ("LLMMESH_INTERNAL_TOKEN", "LLMMESH_INSECURE_INTERNAL")
    return {name: {e["name"]: e for e in container(find(docs, kind, f"prod-llm-mesh-{name}"))["env"] if e["name"] in names}
            for kind, name in SERVICES}


def test_every_service_gets_the_internal_token_from_a_secret(chart):
    docs = render(chart, {})
    token = base64.b64decode(find(docs, "Secret", "prod-llm-mesh-internal-token")["data"]["token"]).decode()
    assert len(token) == 48  # random, made by the chart: another install gets another
    assert base64.b64decode(find(render(chart, {}), "Secret", "prod-llm-mesh-internal-token")["data"]["token"]) \
        != token.encode()
    for kind, name in SERVICES:
        c = container(find(docs, kind, f"prod-llm-mesh-{name}"))
        ref = _internal_env(docs)[name]["LLMMESH_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "prod-llm-mesh-internal-token", "key": "token"}, name
        assert token not in " ".join(c["args"])  # the environment, never the command line
    own = render(chart, VALUE_SETS["internal-token-secret"])
    assert not [d for d in own if d["kind"] == "Secret" and d["metadata"]["name"].endswith("internal-token")]
    assert all(env["LLMMESH_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mesh-internal"
               for env in _internal_env(own).values())


def test_with_tls_the_certificates_are_the_credential_and_insecure_turns_it_off(chart):
    tls = render(chart, VALUE_SETS["tls-auth"])
    assert not [d for d in tls if d["kind"] == "Secret" and d["metadata"]["name"].endswith("internal-token")]
    assert all(env == {} for env in _internal_env(tls).values())  # mutual TLS instead
    insecure = render(chart, VALUE_SETS["insecure-internal"])
    assert not [d for d in insecure if d["kind"] == "Secret" and d["metadata"]["name"].endswith("internal-token")]
    assert all(env["LLMMESH_INSECURE_INTERNAL"]["value"] == "1" for env in _internal_env(insecure).values())
    for kind, name in SERVICES:
        assert "--tls-client-auth" not in container(find(insecure, kind, f"prod-llm-mesh-{name}"))["args"]


def test_kuberay_puts_the_workers_in_a_ray_cluster(chart):
    docs = render(chart, VALUE_SETS["kuberay"])
    ray = find(docs, "RayCluster", "prod-llm-mesh-ray")
    worker = ray["spec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 2
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    shard = container(find(docs, "StatefulSet", "prod-llm-mesh-shard"))
    env = {e["name"]: e.get("value") for e in shard["env"]}
    assert env["RAY_ADDRESS"] == "ray://prod-llm-mesh-ray-head-svc:10001"
    assert "nvidia.com/gpu" not in shard["resources"]["limits"]  # the GPUs sit with the Ray workers


@pytest.mark.parametrize("values, message", [
    ({"shards": {"dtype": "fp8"}}, "/shards/dtype"),
    ({"shards": {"kvCacheDtype": "fp8"}}, "/shards/kvCacheDtype"),
    ({"shards": {"replicas": -1}}, "/shards/replicas"),
    ({"shards": {"tensorParallelSize": 0}}, "/shards/tensorParallelSize"),
    ({"shardz": {"replicas": 2}}, "shardz"),
    ({"gateway": {"grpcPort": 70000}}, "/gateway/grpcPort"),
    ({"tls": {"enabled": True}}, "/tls/existingSecret"),
    ({"auth": {"enabled": True, "apiKeys": ["acme plaintext-key"]}}, "/auth/apiKeys/0"),
    ({"tracing": {"otlpEndpoint": "collector:4317"}}, "/tracing/otlpEndpoint"),
    ({"conversations": {"store": "postgresql"}}, "/conversations/urlSecret/name"),
    ({"conversations": {"store": "sqlite"}}, "/gateway/replicas"),  # two replicas, two SQLite stores
    ({"conversations": {"store": "mysql"}}, "/conversations/store"),
    ({"metrics": {"rules": {"slo": {"ttft": {"thresholdSeconds": "0.7"}}}}}, "/metrics/rules/slo/ttft/thresholdSeconds"),
    ({"metrics": {"rules": {"slo": {"availability": {"objective": 1}}}}}, "/metrics/rules/slo/availability/objective"),
])
def test_bad_values_are_refused_with_the_offending_key(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name="prod", namespace="serving")
    assert message in str(err.value)


def test_conversation_store_settings_reach_the_gateway(chart):
    shared = render(chart, VALUE_SETS["conversations-postgresql"])
    gateway = container(find(shared, "Deployment", "prod-llm-mesh-gateway"))
    url = next(e for e in gateway["env"] if e["name"] == "LLMMESH_CONVERSATION_STORE")
    assert url["valueFrom"]["secretKeyRef"] == {"name": "mesh-db", "key": "url"}
    assert {"--store-key-file=/etc/llm-mesh/store/keys", "--redact-personal-data",
            "--store-retention-days=30"} <= set(gateway["args"])
    assert not any(a.startswith("--conversation-store") for a in gateway["args"])  # the Secret's URL, not a default
    single = render(chart, VALUE_SETS["conversations-sqlite"])
    deployment = find(single, "Deployment", "prod-llm-mesh-gateway")
    assert "--conversation-store=sqlite:////data/conversations.sqlite3" in container(deployment)["args"]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert volume["persistentVolumeClaim"] == {"claimName": "mesh-data"}
    default = container(find(render(chart, {}), "Deployment", "prod-llm-mesh-gateway"))
    assert "--conversation-store=none" in default["args"]


def _rule_groups(docs: list[dict]) -> list[dict]:
    return find(docs, "PrometheusRule", "prod-llm-mesh")["spec"]["groups"]


def test_the_prometheus_rule_is_the_rules_file_with_the_slo_values(chart, tmp_path):
    import shutil
    import subprocess

    plain = yaml.safe_load((CHART / "rules" / "llm-mesh.rules.yaml").read_text())["groups"]
    assert not [d for d in render(chart, {}) if d["kind"] == "PrometheusRule"]  # off unless asked for
    assert _rule_groups(render(chart, {"metrics": {"rules": {"enabled": True}}})) == plain
    docs = render(chart, VALUE_SETS["rules"])
    rule = find(docs, "PrometheusRule", "prod-llm-mesh")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups = _rule_groups(docs)
    assert [g["name"] for g in groups] == [g["name"] for g in plain]
    assert groups[1:] != plain[1:] and all(  # the same rules but for the runbook links
        "wiki.example.com/llm-mesh/runbooks.md#" in r["annotations"]["runbook_url"]
        for g in groups for r in g["rules"] if "alert" in r)
    parameters = {(r["record"], r["labels"]["slo"]): r for r in groups[0]["rules"]}
    assert parameters["llmmesh:slo_objective:ratio", "ttft"]["expr"] == "vector(0.95)"
    assert parameters["llmmesh:slo_threshold:seconds", "ttft"]["labels"]["le"] == "2.5"
    assert parameters["llmmesh:slo_objective:ratio", "availability"]["expr"] == "vector(0.995)"  # the default
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
