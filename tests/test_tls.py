"""TLS to the gateway and mutual TLS between services, with certificates from services.common.tls."""

from __future__ import annotations

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common.tls import make_certs
from services.launcher import Mesh, client_channel, plan_mesh

from .conftest import free_ports

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tls_mesh(real_model_dir, vocab_sized_tiny_model, tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    make_certs(certs)
    ports = free_ports(4)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:], metrics_ports=[0, 0, 0],
                     gateway_metrics_port=0, shard_args=["--kv-cache-mb", "32"], tls_dir=certs)
    plan.shards[0].args[plan.shards[0].args.index("--model") + 1] = str(vocab_sized_tiny_model)
    with Mesh(plan, log_dir=certs / "logs").start(timeout=120) as mesh:
        yield mesh


def test_a_client_that_trusts_the_ca_is_served(tls_mesh):
    ca = (tls_mesh.plan.tls_dir / "ca.pem").read_bytes()
    with grpc.secure_channel(tls_mesh.gateway_address, grpc.ssl_channel_credentials(ca)) as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=60)
    assert reply.usage.completion_tokens == 3


def test_plaintext_to_the_gateway_gets_nothing(tls_mesh):
    with grpc.insecure_channel(tls_mesh.gateway_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(prompt="Hello"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_backends_require_a_client_certificate(tls_mesh):
    address = tls_mesh.plan.tokenizer.listen
    ca = (tls_mesh.plan.tls_dir / "ca.pem").read_bytes()
    request = tokenizer_pb2.EncodeRequest(prompt="hi")
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:  # TLS, but no client cert
        with pytest.raises(grpc.RpcError) as err:
            tokenizer_pb2_grpc.TokenizerStub(channel).Encode(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with client_channel(address, tls_mesh.plan.tls_dir) as channel:  # mutual TLS
        assert tokenizer_pb2_grpc.TokenizerStub(channel).Encode(request, timeout=10).token_ids
