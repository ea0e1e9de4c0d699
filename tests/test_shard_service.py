"""A model shard process on its own (tiny model): backpressure and the shard contract."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmmesh.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from services.common.errors import retry_delay_s

from .conftest import internal_channel, shard_process


@pytest.fixture(scope="module")
def small_shard(tiny_model_dir, tmp_path_factory):
    with shard_process(tiny_model_dir, tmp_path_factory.mktemp("shard") / "shard.log", "--max-running", "1",
                       "--max-waiting", "1", "--retry-after", "0.75", "--kv-cache-mb", "4", "--threads", "1",
                       timeout=60) as (listen, _):
        with internal_channel(listen) as channel:
            yield shard_pb2_grpc.ModelShardStub(channel)


def _generate(stub, prompt, max_tokens):
    request = shard_pb2.ShardGenerateRequest(prompt_token_ids=prompt,
                                             sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    try:
        return [t for msg in stub.Generate(request, timeout=60) for t in msg.token_ids]
    except grpc.RpcError as exc:
        return exc


def test_a_full_queue_answers_resource_exhausted_with_a_retry_delay(small_shard):
    prompts = [[5, 6, 7, i] for i in range(8)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: _generate(small_shard, p, 150), prompts))
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert refused and served
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in err.details()
        assert retry_delay_s(err) == 0.75
    for tokens in served:  # nothing accepted is lost
        assert 0 < len(tokens) <= 150 and (len(tokens) == 150 or tokens[-1] == 2)


def test_shard_checks_its_input(small_shard):
    for prompt, fragment in (([], "empty"), ([999999], "vocabulary")):
        err = _generate(small_shard, prompt, 4)
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.details()
    info = small_shard.Info(shard_pb2.ShardInfoRequest(), timeout=10)
    assert info.max_running == 1 and info.block_size == 16 and info.num_blocks > 0
