"""The OpenAI request bodies the HTTP front accepts, as pydantic models: OpenAI's fields with their
bounds, and the extensions vLLM's users send. Fields not named here are kept (model_extra) for the
modules that read them (openai_structured.py, openai_tools.py) and otherwise ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BadParam(ValueError):
    """A field of the body the request models let through but the mesh cannot serve as sent: a 400
    naming that field (openai_structured.py, openai_tools.py)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param

UINT32_MAX = 2**32 - 1  # the gRPC contract's integer fields: larger values are refused, not wrapped


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a JSON value a string holds a lone UTF-16 surrogate (json accepts "\\ud800"; UTF-8 and
    protobuf cannot carry it), or None."""
    if isinstance(value, str):
        return path or "body" if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _surrogate_path(key):
            return f"{path}.{key!r}" if path else repr(key)
        found = _surrogate_path(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class _Validated(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _surrogate_path(data)
        if where:
            raise ValueError(f"{where} holds a lone surrogate, which is not Unicode text")
        return data


class ChatContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    role: str
    content: str | list[ChatContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(_Validated):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=UINT32_MAX)  # the gateway's --max-n bounds it
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    user: str | None = None
    # Not in OpenAI's schema; as vLLM accepts them.
    top_k: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0, le=UINT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    priority: int | None = Field(default=None, ge=0, le=UINT32_MAX)  # 0 interactive, 1 standard, 2 batch
    cache_salt: str | None = Field(default=None, min_length=1)  # a further prefix-cache scope in the tenant
    response_format: dict[str, Any] | None = None  # and vLLM's structured-output fields: openai_structured.py


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=UINT32_MAX)  # the gateway bounds it (20)


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=UINT32_MAX)  # alternatives per position (the gateway: <= 20)
    echo: bool = False
