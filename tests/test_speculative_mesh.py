"""Speculative decoding through the whole mesh: the same greedy answer as a shard without it,
streamed several tokens a message, counted in /metrics and the decode span, and earlier answers
proposed only to their own tenant."""

from __future__ import annotations

import grpc
import pytest

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.auth import hash_key
from services.launcher import Mesh, plan_mesh
from services.trace_view import load_spans

from .conftest import free_ports, sample_value, scrape_metrics, wait_for

pytestmark = pytest.mark.e2e
KEYS = {"tenant-a": "sk-a-speculative-0123456789", "tenant-b": "sk-b-speculative-0123456789"}
PARAGRAPH = ("Our shop opens at nine every morning and closes at six in the evening. Returns are accepted "
             "within thirty days with the receipt, and refunds reach the original card within five days.")


@pytest.fixture(scope="module")
def spec_mesh(real_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    (root / "keys").write_text("".join(f"{tenant} {hash_key(key)}\n" for tenant, key in KEYS.items()))
    ports = free_ports(5)
    plan = plan_mesh(str(real_model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4],
                     metrics_ports=[0, 0, ports[4]], gateway_metrics_port=0,
                     shard_args=["--kv-cache-mb", "128", "--speculative", "suffix"],
                     gateway_args=["--api-keys-file", str(root / "keys"), "--no-response-cache"])
    with Mesh(plan, env={"LLMMESH_TRACE_DIR": str(root / "traces")}, log_dir=root).start(timeout=240) as m:
        m.trace_dir = root / "traces"
        with grpc.insecure_channel(m.gateway_address) as channel:
            m.stub = gateway_pb2_grpc.GatewayStub(channel)
            yield m


def _stream(stub, text: str, key: str, max_tokens: int = 48) -> list[common_pb2.ChatMessage]:
    request = gateway_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=text)],
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    return list(stub.GenerateStream(request, timeout=120, metadata=[("authorization", f"Bearer {key}")]))


def _accepted(mesh, proposer: str) -> float:
    return sample_value(scrape_metrics(mesh.plan.shards[0].metrics_port), "llmmesh_speculative_accepted_tokens_total",
                        proposer=proposer)


def test_a_copying_answer_is_the_plain_shard_s_and_comes_several_tokens_a_message(spec_mesh, gateway):
    question = f"Repeat this text exactly: {PARAGRAPH}"
    before = _accepted(spec_mesh, "ngram")
    chunks = _stream(spec_mesh.stub, question, KEYS["tenant-a"])
    plain = list(gateway.GenerateStream(gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=question)],
        sampling=common_pb2.SamplingParams(max_tokens=48)), timeout=120))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == [t for c in plain for t in c.token_ids] and len(tokens) > 24
    assert "".join(c.text for c in chunks) == "".join(c.text for c in plain)
    assert max(len(c.token_ids) for c in chunks) > 1  # accepted proposals arrive with their step's token
    assert _accepted(spec_mesh, "ngram") > before

    def decode_span():
        spans = [s for s in load_spans(spec_mesh.trace_dir) if s["name"] == "decode"
                 and s["attributes"].get("llmmesh.completion_tokens") == len(tokens)]
        return spans[-1] if spans else None

    assert wait_for(decode_span)["attributes"]["llmmesh.speculative_accepted_tokens"] > 0


def test_earlier_answers_are_proposed_to_their_own_tenant_only(spec_mesh):
    question = "What should I do if my parcel arrives damaged? Answer in two sentences."
    first = _stream(spec_mesh.stub, question, KEYS["tenant-a"])
    before = _accepted(spec_mesh, "suffix")
    other = _stream(spec_mesh.stub, question, KEYS["tenant-b"])
    assert _accepted(spec_mesh, "suffix") == before  # tenant-a's answer was not proposed to tenant-b
    again = _stream(spec_mesh.stub, question, KEYS["tenant-a"])
    assert _accepted(spec_mesh, "suffix") > before  # but is to tenant-a
    texts = {"".join(c.text for c in answer) for answer in (first, other, again)}
    assert len(texts) == 1  # greedy: the same answer whatever was proposed
