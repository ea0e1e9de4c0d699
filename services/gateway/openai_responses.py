"""OpenAI's Responses and Conversations APIs on the HTTP front: translation only. Turns run through
conversations.py (history, saving) and the gateway's request path; the store answers the rest."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.conversations import Conversations, TurnPlan
from services.gateway.errors import RpcError
from services.gateway.items import input_items, message_item
from services.gateway.openai_http import _prepend
from services.gateway.openai_requests import UINT32_MAX, BadParam, _Validated

MAX_PAGE = 100


class ResponsesRequest(_Validated):
    model_config = ConfigDict(extra="forbid")  # a field not served here is refused by name

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # not OpenAI's; as vLLM accepts it
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    priority: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    cache_salt: str | None = Field(default=None, min_length=1)  # as vLLM's: a further prefix-cache scope

    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, dict):
            if not isinstance(self.conversation.get("id"), str):
                raise BadParam("conversation must be an id or {\"id\": ...}", "conversation")
            return self.conversation["id"]
        return self.conversation

    def check_served(self) -> None:
        if self.tools:
            raise BadParam("tools are not served on /v1/responses yet; use /v1/chat/completions", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise BadParam("tool_choice needs tools, which /v1/responses does not serve yet", "tool_choice")
        fmt = (self.text or {}).get("format", {"type": "text"})
        if (self.text or {}).keys() - {"format"} or not isinstance(fmt, dict) or fmt.get("type") != "text":
            raise BadParam("text.format other than {\"type\": \"text\"} is not served on /v1/responses yet; "
                           "use response_format on /v1/chat/completions", "text")


class ConversationCreate(_Validated):
    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None


class ConversationUpdate(_Validated):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str]


class ItemsCreate(_Validated):
    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]]


def add_routes(app: FastAPI, front, conversations: Conversations) -> None:
    """front: the OpenAIFront (auth, model check, timeouts, error mapping)."""

    async def store_call(operation, what: str):
        return await front.rpc(conversations.found(operation, what))

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        front._check_model(body.model)
        body.check_served()
        tenant = front._auth(request)
        options = {"temperature": 1.0 if body.temperature is None else body.temperature,
                   "top_p": body.top_p or 1.0, "max_output_tokens": body.max_output_tokens, "user": body.user,
                   "metadata": body.metadata or {}}
        plan = await front.rpc(conversations.plan(
            tenant, input_items(body.input), instructions=body.instructions,
            previous_response_id=body.previous_response_id, conversation_id=body.conversation_id(),
            store=body.store, options=options))
        grpc_request = gateway_pb2.GenerateRequest(sampling=_sampling(body), request_id=plan.response_id)
        if body.priority is not None:
            grpc_request.priority = body.priority
        if body.cache_salt is not None:
            grpc_request.cache_salt = body.cache_salt
        chunks = conversations.run(plan, grpc_request, front._timeout(request), "http")
        if body.stream:
            events = _events(plan, chunks, front)
            first = await anext(events)  # a refusal before the first token keeps its HTTP status
            return StreamingResponse(_prepend(first, events), media_type="text/event-stream")
        await front.rpc(front._collect_unless_abandoned(request, grpc_request, tenant, chunks))
        return plan.response

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        tenant = front._auth(request)
        doc = await store_call(lambda s: s.get_response(tenant, response_id), f"response {response_id!r}")
        return doc["response"]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        tenant = front._auth(request)
        await store_call(lambda s: s.delete_response(tenant, response_id), f"response {response_id!r}")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, request: Request, limit: int = 20, after: str | None = None,
                                   order: Literal["asc", "desc"] = "desc"):
        tenant = front._auth(request)
        doc = await store_call(lambda s: s.get_response(tenant, response_id), f"response {response_id!r}")
        items, limit = doc["input_items"][::-1] if order == "desc" else doc["input_items"], _limit(limit)
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else items
        return _page(items[:limit], len(items) > limit)

    @app.post("/v1/conversations")
    async def create_conversation(body: ConversationCreate, request: Request):
        tenant = front._auth(request)
        return await front.rpc(conversations.call(
            lambda s: s.create_conversation(tenant, body.metadata or {}, input_items(body.items or [], "items"))))

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request):
        tenant = front._auth(request)
        return await store_call(lambda s: s.get_conversation(tenant, conversation_id),
                                f"conversation {conversation_id!r}")

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, body: ConversationUpdate, request: Request):
        tenant = front._auth(request)
        return await store_call(lambda s: s.update_conversation(tenant, conversation_id, body.metadata),
                                f"conversation {conversation_id!r}")

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, request: Request):
        tenant = front._auth(request)
        await store_call(lambda s: s.delete_conversation(tenant, conversation_id), f"conversation {conversation_id!r}")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/conversations/{conversation_id}/items")
    async def list_items(conversation_id: str, request: Request, limit: int = 20, after: str | None = None,
                         order: Literal["asc", "desc"] = "desc"):
        tenant = front._auth(request)
        items, more = await store_call(
            lambda s: s.list_items(tenant, conversation_id, _limit(limit), after, order == "desc"),
            f"conversation {conversation_id!r}")
        return _page(items, more)

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_items(conversation_id: str, body: ItemsCreate, request: Request):
        tenant = front._auth(request)
        items = input_items(body.items, "items")
        added = await store_call(lambda s: s.add_items(tenant, conversation_id, items),
                                 f"conversation {conversation_id!r}")
        return _page(added, False)

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def get_item(conversation_id: str, item_id: str, request: Request):
        tenant = front._auth(request)
        return await store_call(lambda s: s.get_item(tenant, conversation_id, item_id), f"item {item_id!r}")

    @app.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_item(conversation_id: str, item_id: str, request: Request):
        tenant = front._auth(request)
        await store_call(lambda s: s.delete_item(tenant, conversation_id, item_id), f"item {item_id!r}")
        return await store_call(lambda s: s.get_conversation(tenant, conversation_id),
                                f"conversation {conversation_id!r}")


def _sampling(body: ResponsesRequest) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(max_tokens=body.max_output_tokens or 0,
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_p=body.top_p or 0.0)
    if body.seed is not None:
        s.seed = body.seed
    return s


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise BadParam(f"limit must be between 1 and {MAX_PAGE}", "limit")
    return limit


def _page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


async def _events(plan: TurnPlan, chunks, front):
    """The Responses event stream of one turn (server-sent events, each named by its type)."""
    seq = iter(range(1 << 62))
    item_id = plan.output_item_id
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    in_progress = {"id": plan.response_id, "object": "response", "created_at": plan.created_at,
                   "status": "in_progress", "model": front.model, "output": [],
                   "previous_response_id": plan.previous_response_id, "store": plan.store,
                   "instructions": plan.instructions,
                   "conversation": {"id": plan.conversation_id} if plan.conversation_id else None}
    started, text = False, []
    try:
        async for chunk in chunks:
            if not started:  # after the first message: an error before it is the request's status
                started = True
                yield event("response.created", response=in_progress)
                yield event("response.in_progress", response=in_progress)
                yield event("response.output_item.added", output_index=0,
                            item={"id": item_id, "type": "message", "status": "in_progress", "role": "assistant",
                                  "content": []})
                yield event("response.content_part.added", **where,
                            part={"type": "output_text", "text": "", "annotations": []})
            if chunk.text:
                text.append(chunk.text)
                yield event("response.output_text.delta", **where, delta=chunk.text, logprobs=[])
    except RpcError as exc:
        if not started:
            raise front.error(exc) from None
        err = front.error(exc)
        yield event("error", code=err.code, message=str(err), param=None)
        return
    done = message_item("assistant", "".join(text), item_id)
    yield event("response.output_text.done", **where, text=done["content"][0]["text"], logprobs=[])
    yield event("response.content_part.done", **where, part=done["content"][0])
    yield event("response.output_item.done", output_index=0, item=done)
    final = plan.response
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


