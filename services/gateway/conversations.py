"""Turns of stored conversations, between a front and the gateway's request path (no transport here).

A turn continues either a stored response (previous_response_id: the chain's inputs and outputs go
first) or a conversation (its items go first, and the turn is added to it). The model sees the history
as chat messages, and the earlier turn's own token ids are reused as they are (Continuation), so the
shard's cached blocks of that turn match token for token. A turn is saved after its last token and
before its last message leaves: a turn the caller saw complete is in the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.errors import RpcError, unavailable_for_now
from services.gateway.items import item_messages, message_item
from services.gateway.prompt_encoding import Continuation
from services.gateway.store.database import StoreUnavailable
from services.gateway.store.sealing import SealError
from services.gateway.store.store import ConversationStore, History, Turn, new_id


@dataclass
class TurnPlan:
    """One turn, ready to run: what the model is shown and what will be saved."""

    tenant: str
    response_id: str
    created_at: int
    input_items: list[dict]
    messages: list[common_pb2.ChatMessage]
    context_ids: list[int]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    options: dict = field(default_factory=dict)  # echoed in the response object (temperature, ...)
    output_item_id: str = field(default_factory=lambda: new_id("msg"))
    response: dict | None = None  # the response object, once the turn finished


class Conversations:
    def __init__(self, store: ConversationStore | None, gateway, model: str):
        self.store = store
        self.gateway = gateway
        self.model = model

    # --- a turn ---

    async def plan(self, tenant: str, input_items: list[dict], *, instructions: str | None = None,
                   previous_response_id: str | None = None, conversation_id: str | None = None,
                   store: bool = True, options: dict | None = None) -> TurnPlan:
        if previous_response_id and conversation_id:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           "send previous_response_id or conversation, not both")
        history = History()
        if previous_response_id:
            history = await self.found(lambda s: s.response_history(tenant, previous_response_id),
                                       f"response {previous_response_id!r}")
        elif conversation_id:
            history = await self.found(lambda s: s.conversation_history(tenant, conversation_id),
                                       f"conversation {conversation_id!r}")
        if store or conversation_id:  # refused now, not after the answer was made
            await self._call(self._writable())
        system = [common_pb2.ChatMessage(role="system", content=instructions)] if instructions else []
        return TurnPlan(tenant, new_id("resp"), int(time.time()), input_items,
                        system + item_messages(history.items + input_items), history.context_ids, instructions,
                        previous_response_id or None, conversation_id or None, store or bool(conversation_id),
                        options or {})

    async def run(self, plan: TurnPlan, request: gateway_pb2.GenerateRequest, timeout_s: float | None,
                  front: str):
        """The turn's messages from the request path; the last one leaves after the turn is saved,
        with its response_id. plan.response is the response object by then."""

        del request.messages[:]
        request.messages.extend(plan.messages)
        continuation = Continuation(plan.context_ids)
        text, token_ids, held = [], [], None
        async for chunk in self.gateway.generate(request, timeout_s, plan.tenant, front, continuation):
            text.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            if chunk.finish_reason:  # the last message (one choice): it waits for the save
                held = chunk
            else:
                yield chunk
        if held is None:
            return
        usage = held.usage
        plan.response = self.response_object(plan, "".join(text), held.finish_reason, usage)
        if plan.store:
            turn = Turn(plan.response, plan.input_items, continuation.prompt_ids + token_ids,
                        plan.conversation_id, plan.previous_response_id)
            try:
                await self._call(self._store().save_turn(plan.tenant, turn))
            except KeyError:
                raise RpcError(grpc.StatusCode.NOT_FOUND,
                               f"conversation {plan.conversation_id!r} was deleted during the turn") from None
            held.response_id = plan.response_id
        yield held

    def response_object(self, plan: TurnPlan, text: str, finish_reason: str, usage: common_pb2.Usage) -> dict:
        """The Responses API's object for a finished turn."""
        incomplete = finish_reason == "length"
        return {
            "id": plan.response_id, "object": "response", "created_at": plan.created_at,
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "model": self.model, "instructions": plan.instructions,
            "output": [message_item("assistant", text, plan.output_item_id)],
            "previous_response_id": plan.previous_response_id,
            "conversation": {"id": plan.conversation_id} if plan.conversation_id else None,
            "store": plan.store, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
            **plan.options,
            "usage": {"input_tokens": usage.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": usage.cached},
                      "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage.prompt_tokens + usage.completion_tokens},
        }

    # --- the store, with its faults as statuses ---

    def _store(self) -> ConversationStore:
        if self.store is None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "this gateway keeps no conversations "
                           "(--conversation-store none); send store: false and the whole history")
        return self.store

    async def _writable(self) -> None:
        """The store, if it can take this turn: there is one, and its database is not known down."""
        self._store().db.refuse_if_down()

    async def call(self, operation):
        """operation(store), a store call for a front (get, delete, list, ...), its faults as RpcError."""
        return await self._call(operation(self._store()))

    async def found(self, operation, what: str):
        """call(operation)'s result; NOT_FOUND naming `what` when the store found nothing (None or
        False: absent, or another tenant's)."""
        result = await self.call(operation)
        if result is None or result is False:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no {what}")
        return result

    @staticmethod
    async def _call(operation):
        try:
            return await operation
        except StoreUnavailable as exc:
            if exc.retry_after_s is not None:
                raise unavailable_for_now(str(exc), exc.retry_after_s) from None
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except SealError as exc:
            raise RpcError(grpc.StatusCode.INTERNAL, f"a stored item cannot be read: {exc}") from None
