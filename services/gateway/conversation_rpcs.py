"""The Gateway service's stored-conversation RPCs (gRPC's face of conversations.py and the store)."""

from __future__ import annotations

import grpc

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.errors import RpcError
from services.gateway.items import item_messages, message_items
from services.gateway.openai_requests import BadParam


def is_stored_turn(request: gateway_pb2.GenerateRequest) -> bool:
    return bool(request.previous_response_id or request.conversation or request.store)


class ConversationRpcs:
    """Mixed into GatewayServicer: needs self.conversations, self.authenticate and _status_of."""

    async def stored_turn(self, request: gateway_pb2.GenerateRequest, timeout_s: float | None, tenant: str):
        """A GenerateRequest that continues or keeps a conversation, as a stream of messages."""
        if request.prompt:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "a stored turn sends messages, not a prompt")
        if request.tools:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "tools are not served with stored turns yet")
        if request.sampling.n > 1:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "a stored turn has one answer; send n = 1")
        items = _items(request.messages)
        store = request.store if request.HasField("store") else True
        plan = await self.conversations.plan(
            tenant, items, previous_response_id=request.previous_response_id or None,
            conversation_id=request.conversation or None, store=store)
        async for chunk in self.conversations.run(plan, request, timeout_s, "grpc"):
            yield chunk

    async def GetResponse(self, request: gateway_pb2.StoredResponseRequest, context):
        async with self._status_of("GetResponse", context):
            tenant = self._tenant(context)
            doc = await self.conversations.found(lambda s: s.get_response(tenant, request.id),
                                                 f"response {request.id!r}")
            r = doc["response"]
            u = r["usage"]
            return gateway_pb2.StoredResponse(
                id=r["id"], created_at=r["created_at"], conversation=(r.get("conversation") or {}).get("id", ""),
                previous_response_id=r.get("previous_response_id") or "", input=item_messages(doc["input_items"]),
                output=item_messages(r["output"]), status=r["status"], model=r["model"],
                usage=common_pb2.Usage(prompt_tokens=u["input_tokens"], completion_tokens=u["output_tokens"],
                                       cached=u["input_tokens_details"]["cached_tokens"]))

    async def DeleteResponse(self, request: gateway_pb2.StoredResponseRequest, context):
        async with self._status_of("DeleteResponse", context):
            tenant = self._tenant(context)
            await self.conversations.found(lambda s: s.delete_response(tenant, request.id), f"response {request.id!r}")
            return gateway_pb2.Deleted(id=request.id, deleted=True)

    async def CreateConversation(self, request: gateway_pb2.CreateConversationRequest, context):
        async with self._status_of("CreateConversation", context):
            tenant = self._tenant(context)
            items = _items(request.messages)
            made = await self.conversations.call(lambda s: s.create_conversation(tenant, dict(request.metadata), items))
            return _conversation(made)

    async def GetConversation(self, request: gateway_pb2.ConversationRequest, context):
        async with self._status_of("GetConversation", context):
            tenant = self._tenant(context)
            return _conversation(await self.conversations.found(lambda s: s.get_conversation(tenant, request.id),
                                                   f"conversation {request.id!r}"))

    async def DeleteConversation(self, request: gateway_pb2.ConversationRequest, context):
        async with self._status_of("DeleteConversation", context):
            tenant = self._tenant(context)
            await self.conversations.found(lambda s: s.delete_conversation(tenant, request.id),
                                           f"conversation {request.id!r}")
            return gateway_pb2.Deleted(id=request.id, deleted=True)

    async def ListConversationItems(self, request: gateway_pb2.ConversationRequest, context):
        async with self._status_of("ListConversationItems", context):
            tenant = self._tenant(context)
            history = await self.conversations.found(lambda s: s.conversation_history(tenant, request.id),
                                        f"conversation {request.id!r}")
            return gateway_pb2.ConversationItems(messages=item_messages(history.items))


def _conversation(c: dict) -> gateway_pb2.Conversation:
    return gateway_pb2.Conversation(id=c["id"], created_at=c["created_at"], metadata=c.get("metadata") or {})


def _items(messages) -> list[dict]:
    """gRPC chat messages as stored items; what cannot be stored is INVALID_ARGUMENT."""
    try:
        return message_items(messages)
    except BadParam as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
