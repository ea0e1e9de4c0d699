"""Per-tenant rate limits: the buckets on a fake clock, and a gateway process that enforces them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.errors import retry_delay_s
from services.gateway.auth import hash_key
from services.gateway.rate_limit import RateLimited, TenantRateLimiter
from services.launcher import wait_healthy

from .conftest import free_ports, metric

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_second_bucket():
    clock = FakeClock()
    limiter = TenantRateLimiter(requests_per_s=2, burst_s=1, clock=clock)
    limiter.admit("a")
    limiter.admit("a")
    with pytest.raises(RateLimited) as err:
        limiter.admit("a")
    assert err.value.retry_after_s == pytest.approx(0.5)
    limiter.admit("b")  # tenants are independent
    clock.now += 0.5
    limiter.admit("a")


def test_tokens_per_minute_bucket_allows_overdraw_then_waits():
    clock = FakeClock()
    limiter = TenantRateLimiter(tokens_per_min=600, clock=clock)  # 10 tokens/s, 600 in the bucket
    limiter.admit("a")
    limiter.charge_tokens("a", 700)  # one big request overdraws by 100
    with pytest.raises(RateLimited) as err:
        limiter.admit("a")
    assert err.value.retry_after_s == pytest.approx(10.1)
    clock.now += 10.2
    limiter.admit("a")


@pytest.mark.e2e
def test_gateway_refuses_a_tenant_over_its_limit(mesh):
    keys = {"alpha": "sk-alpha-key", "beta": "sk-beta-key"}
    root = Path(mesh.log_dir).parent / "rate-limit"
    root.mkdir(exist_ok=True)
    (root / "keys").write_text("".join(f"{t} {hash_key(k)}\n" for t, k in keys.items()))
    port, http_port, metrics_port = free_ports(3)
    p = mesh.plan
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--listen", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port),
         "--http-listen", f"127.0.0.1:{http_port}", "--api-keys-file",
         str(root / "keys"), "--rate-limit-rps", "0.2", "--tokenizer", p.tokenizer.listen, "--cache",
         p.cache.listen, "--shards", ",".join(s.listen for s in p.shards)],
        cwd=ROOT, stdout=open(root / "gateway.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{port}", 60, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=2))

            def call(tenant):
                return list(stub.GenerateStream(request, timeout=60,
                                                metadata=[("authorization", f"Bearer {keys[tenant]}")]))

            assert call("alpha")[-1].finish_reason
            with pytest.raises(grpc.RpcError) as err:
                call("alpha")  # 0.2 requests/s: the second within 5 s is refused, with no token served
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "requests per second" in err.value.details()
            assert 4 < retry_delay_s(err.value) <= 5
            assert call("beta")[-1].finish_reason  # another tenant is not held back
        # The HTTP front shares the limiter: alpha is still over its rate there.
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2}).encode()
        http = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body, method="POST",
                                      headers={"content-type": "application/json",
                                               "authorization": f"Bearer {keys['alpha']}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(http, timeout=30)
        assert refused.value.code == 429
        assert 1 <= int(refused.value.headers["retry-after"]) <= 5
        assert json.loads(refused.value.read())["error"]["type"] == "rate_limit_error"
        # Both refusals counted against alpha, none against beta: what LLMMeshTenantRateLimitFlood reads.
        assert metric(metrics_port, "llmmesh_rate_limited_requests_total", tenant="alpha") == 2
        assert metric(metrics_port, "llmmesh_rate_limited_requests_total", tenant="beta") == 0
    finally:
        proc.terminate()
        proc.wait(30)
