"""The gateway's copy of the tokenizer's vocabulary: fetched from the tokenizer service over gRPC,
used only for requests encoded with the same version, and giving the same deltas as the service."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmmesh.v1 import tokenizer_pb2_grpc
from services.gateway.detokenize import DetokenizeSession, LocalDetokenizeSession, TokenizerMirror
from services.tokenizer.text import TextTokenizer

from .conftest import with_tokenizer_service

TEXT = "Rivers 河流 flow to the sea 🌊, über alles. 好的!"


async def _deltas(session, ids: list[int]) -> list[str]:
    deltas = [await session.push([i]) for i in ids]  # one token a step, as a single stream decodes
    deltas.append(await session.flush())
    await session.close()
    return deltas


def test_the_mirror_serves_only_its_own_version_and_matches_the_service(real_model_dir):
    async def scenario(tokenizer, stub):
        mirror = TokenizerMirror(stub)
        assert mirror.session(tokenizer.version) is None  # not held yet: this request goes to the service...
        await mirror._refreshing  # ...and the mirror fetches the vocabulary meanwhile
        assert mirror.version == tokenizer.version
        assert mirror.session("another-version") is None  # a request encoded by another vocabulary
        local = mirror.session(tokenizer.version)
        assert isinstance(local, LocalDetokenizeSession)
        ids = tokenizer.encode(TEXT)
        remote = DetokenizeSession(stub, timeout=30, reply_timeout_s=5)
        return await _deltas(local, ids), await _deltas(remote, ids), tokenizer.decode(ids)

    local, remote, whole = asyncio.run(with_tokenizer_service(TextTokenizer(real_model_dir), scenario))
    assert local == remote
    assert "".join(local) == whole == TEXT
    assert any(d == "" for d in local[:-1])  # some token really split a character


def test_a_mirror_without_a_tokenizer_keeps_serving_through_the_fallback(real_model_dir):
    async def scenario():
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            mirror = TokenizerMirror(tokenizer_pb2_grpc.TokenizerStub(channel), timeout_s=0.5)
            return await mirror.refresh(), mirror.session("v1"), mirror.version

    refreshed, session, version = asyncio.run(scenario())
    assert refreshed is False and session is None and version is None


@pytest.mark.parametrize("version", ["", None])
def test_no_version_means_no_local_session(real_model_dir, version):
    async def scenario():
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            return TokenizerMirror(tokenizer_pb2_grpc.TokenizerStub(channel)).session(version)

    assert asyncio.run(scenario()) is None
