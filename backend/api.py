"""TextbotAPI: the HTTP ingress under /api. It validates requests, streams each
reply from a Textbot replica through a DeploymentHandle, and speaks the
protocols: the tutorial's text stream and WebSocket chat, OpenAI's chat
completions, completions and Responses (backend/openai/), and Anthropic's
Messages (backend/anthropic/). The three chat-like APIs reach the model one
way: each turns its request into a ReplyPlan (backend/openai/plan.py), run by
`_reply`.

It loads no model (no torch import), so it starts in seconds and outlives the
model replicas: when one dies mid-reply, the client still gets an error in its
own protocol.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of
# this class through serve.ingress and cannot resolve string annotations there.
import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from backend.anthropic import messages
from backend.anthropic.protocol import CountTokensRequest, Message, MessagesRequest, TokenCount
from backend.auth import BearerKeyMiddleware
from backend.errors import RETRY_AFTER_S, APIError, GenerationError, install_error_handlers
from backend.limits import install_body_limit
from backend.openai import chat, completions, responses
from backend.openai.plan import ReplyPlan
from backend.openai.protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelCard,
                                     ModelList)
from backend.openai.responses_protocol import Response, ResponseRequest
from backend.protocol import ChatMessage, ReplyPiece, SamplingParams, ToolSpec, check_text
from backend.settings import TextbotSettings

api = FastAPI(
    title="Textbot",
    description="A streaming chatbot backend on Ray Serve.",
    root_path_in_servers=False,
)
install_error_handlers(api)
install_body_limit(api)
api.add_middleware(BearerKeyMiddleware)  # added last, runs first: no key, no body read

# Tell reverse proxies (nginx and friends) to pass each piece through at once.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# How many of the oldest messages `truncation: "auto"` dropped to fit the context.
DROPPED_HEADER = "X-Textbot-Dropped-Messages"
# Ray Serve's own session header name: one conversation's requests carry one value.
SessionHeader = Annotated[str | None, Header(
    alias="x-session-id", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
    description="Names the conversation: its requests go to the model replica that holds its prefix "
                "cache. Without it, the conversation's opening (system messages and first user message) does.")]

# The Ray Serve tutorial's WebSocket protocol: this frame ends each reply.
END_OF_REPLY = "<<Response Finished>>"

# /health waits this long for a model replica to answer.
HEALTH_TIMEOUT_S = 5.0

_REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def replica_cause(error: Exception) -> Exception:
    """The exception a Textbot replica raised, without Ray's RayTaskError wrapper (`.cause`)."""
    return getattr(error, "cause", None) or error


def served_error(error: Exception, mid_reply: bool) -> Exception:
    """What a failed call to a Textbot replica means to the client; Serve's own
    errors say the replica is full or gone."""
    cause = replica_cause(error)
    if isinstance(cause, (APIError, GenerationError)):
        return cause
    if isinstance(cause, BackPressureError):
        return APIError(503, "Every model replica is at capacity. Try again in a few seconds.",
                        code="overloaded", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(cause, _REPLICA_LOST):
        if mid_reply:
            return GenerationError(f"The model replica stopped mid-reply ({type(cause).__name__}); "
                                   "send the request again.")
        return APIError(503, "No model replica could take the request; one is restarting. "
                        "Try again in a few seconds.", code="unavailable", headers={"Retry-After": RETRY_AFTER_S})
    return error


def conversation_key(session_id: str | None, messages: list[ChatMessage] | str | list[int]) -> str:
    """The key that routes a request to a model replica (Textbot's router hashes it: see
    deploy.yaml's request_router_config), so a conversation's turns meet its prefix cache:
    the client's session id, else the conversation's opening, which every later turn repeats
    (for a plain prompt, its first 256 characters or tokens)."""
    if session_id:
        return session_id
    if not messages or not isinstance(messages[0], ChatMessage):
        return hashlib.sha256(json.dumps(messages[:256]).encode()).hexdigest()[:32]
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages) - 1)
    opening = [(m.role, m.content) for m in messages[:first_user + 1]]
    return hashlib.sha256(json.dumps(opening).encode()).hexdigest()[:32]


class RemoteReply:
    """A reply streaming from a Textbot replica: iterate once for its pieces (ReplyPiece:
    text, token counts, and with `n` > 1 the choice's index), or `text()` for its text.
    `prompt` is a conversation (which may call `tools`), a text, or token ids."""

    def __init__(self, handle: DeploymentHandle, route: str, prompt: list[ChatMessage] | str | list[int],
                 sampling: SamplingParams, strict: bool = False, session: str | None = None,
                 tools: list[ToolSpec] | None = None):
        key = conversation_key(session, prompt)
        self._response = (handle.options(stream=True, session_id=key)
                          .stream_reply.remote(prompt, sampling, strict, route, tools))
        self._open = True

    async def __aiter__(self) -> AsyncIterator[ReplyPiece]:
        started = False
        try:
            async for piece in self._response:
                started = True
                yield piece
            self._open = False
        except Exception as error:
            raise served_error(error, started) from None
        finally:
            if self._open:  # the client went away: free the replica's slot now
                self._response.cancel()

    async def text(self) -> AsyncIterator[str]:
        async for piece in self:
            if piece.text:
                yield piece.text


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    # A close frame's reason is limited to 123 bytes of UTF-8.
    await ws.close(code, reason.encode()[:123].decode(errors="ignore"))


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for piece in rest:
        yield piece


async def started(stream) -> AsyncIterator:
    """`stream` with its first item awaited before the response starts: a request the
    replica refuses (overloaded, too long, a schema it cannot enforce) is then an HTTP
    error with its status, not a 200 followed by an error event."""
    items = aiter(stream)
    return _chain(await anext(items, None), items)


# Module-level helpers the class uses stay above it: Serve ships the ingress class
# to replicas by value, and a helper defined below it was missing there (NameError).
# Light work per request, and each open stream or WebSocket holds one of these
# places: far more than Serve's default of 5.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class TextbotAPI:
    def __init__(self, settings: TextbotSettings, textbot: DeploymentHandle):
        self.settings = settings
        self.textbot = textbot
        self.model_name = settings.model.served_name
        self.started = int(time.time())

    @api.post("/", response_class=StreamingResponse, summary="Stream a reply to one prompt")
    async def generate(
        self,
        prompt: Annotated[str, Query(description="The user's message.")],
        max_new_tokens: Annotated[int | None, Query(ge=1, le=8192)] = None,
        temperature: Annotated[float | None, Query(ge=0.0, le=2.0)] = None,
        top_p: Annotated[float | None, Query(gt=0.0, le=1.0)] = None,
        seed: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
        session_id: SessionHeader = None,
    ) -> StreamingResponse:
        """The Ray Serve tutorial's endpoint: the reply as text/plain, piece by piece."""
        messages = [ChatMessage(role="user", content=self._check_text(prompt, "prompt"))]
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed)
        pieces = await started(RemoteReply(self.textbot, "POST /", messages, sampling, session=session_id).text())
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8", headers=STREAM_HEADERS)

    @api.post("/v1/chat/completions", response_model=ChatCompletion,
              summary="OpenAI-compatible chat completions, streaming (SSE) or not")
    async def chat_completions(self, request: ChatCompletionRequest, session_id: SessionHeader = None):
        self._check_model(request.model)
        plan = chat.reply_plan(request, session_id)
        reply, dropped = await self._reply(plan)
        headers = {DROPPED_HEADER: str(dropped)}
        if request.stream:
            return StreamingResponse(chat.sse_stream(request, await started(reply), self.model_name),
                                     media_type="text/event-stream", headers=STREAM_HEADERS | headers)
        return JSONResponse((await chat.complete(request, reply, self.model_name)).model_dump(), headers=headers)

    @api.post("/v1/responses", response_model=Response,
              summary="OpenAI Responses: text and function calls, streaming (typed SSE events) or not")
    async def create_response(self, request: ResponseRequest, session_id: SessionHeader = None):
        self._check_model(request.model)
        plan = responses.reply_plan(request, session_id)
        reply, dropped = await self._reply(plan)
        headers = {DROPPED_HEADER: str(dropped)}
        if request.stream:
            return StreamingResponse(responses.sse_stream(request, plan, await started(reply), self.model_name),
                                     media_type="text/event-stream", headers=STREAM_HEADERS | headers)
        response = await responses.respond(request, plan, reply, self.model_name)
        return JSONResponse(response.model_dump(mode="json", by_alias=True), headers=headers)

    @api.post("/v1/messages", response_model=Message,
              summary="Anthropic Messages: text and tool use, streaming (SSE events) or not")
    async def create_message(self, request: MessagesRequest, session_id: SessionHeader = None):
        self._check_model(request.model)
        plan = messages.reply_plan(request, session_id)
        reply, _ = await self._reply(plan)
        if request.stream:
            return StreamingResponse(messages.sse_stream(plan, await started(reply), self.model_name),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse((await messages.create(plan, reply, self.model_name)).model_dump(mode="json"))

    @api.post("/v1/messages/count_tokens", response_model=TokenCount,
              summary="Anthropic Messages: the prompt's tokens, tools and system prompt included")
    async def count_message_tokens(self, request: CountTokensRequest, session_id: SessionHeader = None) -> TokenCount:
        self._check_model(request.model)
        reply, _ = await self._reply(messages.count_plan(request, session_id))
        return TokenCount(input_tokens=await messages.count(reply))

    @api.post("/v1/completions", response_model=Completion,
              summary="OpenAI-compatible (legacy) text completions, streaming (SSE) or not")
    async def completions(self, request: CompletionRequest, session_id: SessionHeader = None):
        self._check_model(request.model)
        prompts = request.prompts
        if request.text_prompts:
            for prompt in prompts:
                self._check_text(prompt, "prompt")
        sampling = completions.sampling(request)
        replies = [RemoteReply(self.textbot, "POST /v1/completions", prompt, sampling, strict=True,
                               session=session_id) for prompt in prompts]
        if request.stream:
            replies = await asyncio.gather(*map(started, replies))
            return StreamingResponse(completions.sse_stream(request, replies, self.model_name),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse((await completions.complete(request, replies, self.model_name)).model_dump())

    @api.get("/v1/models", response_model=ModelList, summary="The served model")
    async def models(self) -> ModelList:
        try:
            served = await asyncio.wait_for(self.textbot.ready.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - loading, restarting or gone: listed, as not loaded
            served = None
        card = ModelCard(id=self.model_name, created=self.started, loaded=served is not None,
                         quantization=self.settings.model.quantization)
        if served:
            card.context_length = served["context_length"]
            card.engine, card.engine_reason = ("transformers", served["fallback"]) if served["fallback"] else ("textbot", None)
        return ModelList(data=[card])

    @api.websocket("/")
    async def chat_socket(self, ws: WebSocket) -> None:
        """The tutorial's WebSocket chat: each text frame is a user message; the reply
        streams back as text frames, then END_OF_REPLY. The connection keeps the
        conversation, trimmed from its oldest turns to fit the model's context."""
        await ws.accept()
        conversation: list[ChatMessage] = []
        session = ws.headers.get("x-session-id") or uuid.uuid4().hex  # the connection is the conversation
        while True:
            try:
                frame = await ws.receive()
            except WebSocketDisconnect:
                return
            if frame["type"] == "websocket.disconnect":
                return
            text = frame.get("text")
            if text is None:
                return await _close(ws, 1003, "Send text frames: binary frames are not supported.")
            try:
                self._check_text(text, "message")
            except APIError as error:
                return await _close(ws, 1009 if error.status == 413 else 1007, error.message)
            reply = ""
            try:
                conversation, _ = await self._fit([*conversation, ChatMessage(role="user", content=text)])
                async for piece in RemoteReply(self.textbot, "WebSocket /", conversation, SamplingParams(),
                                               session=session).text():
                    reply += piece
                    await ws.send_text(piece)
            except APIError as error:  # 1013: "try again later"
                return await _close(ws, 1013 if error.status == 503 else 1008, error.message)
            except GenerationError as error:
                return await _close(ws, 1011, str(error))
            conversation.append(ChatMessage(role="assistant", content=reply))
            await ws.send_text(END_OF_REPLY)

    @api.get("/health", summary="Ready when a model replica answers")
    async def health(self) -> dict:
        try:
            await asyncio.wait_for(self.textbot.ready.remote(), HEALTH_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            cause = replica_cause(error)
            raise APIError(503, f"No model replica is ready ({type(cause).__name__}: {cause}); "
                           "one may be loading or restarting.",
                           code="unavailable", headers={"Retry-After": RETRY_AFTER_S}) from None
        return {"status": "ok", "model": self.model_name}

    async def _reply(self, plan: ReplyPlan) -> tuple[RemoteReply, int]:
        """The one way every API's request reaches the model: its text checked, the oldest turns
        dropped if asked, then the reply streaming from a replica (with how many turns were dropped)."""
        messages = plan.messages
        for message in messages:
            if not message.tool_calls:  # an assistant turn that only called tools may say nothing
                self._check_text(message.content, plan.param)
        dropped = 0
        if plan.truncate:
            messages, dropped = await self._fit(messages, plan.sampling.max_new_tokens)
        reply = RemoteReply(self.textbot, plan.route, messages, plan.sampling, strict=True,
                            session=plan.session, tools=plan.tool_use.for_prompt())
        return reply, dropped

    async def _fit(self, messages: list[ChatMessage], max_new_tokens: int | None = None
                   ) -> tuple[list[ChatMessage], int]:
        try:
            fitted = await self.textbot.fit_conversation.remote(messages, max_new_tokens)
        except Exception as error:
            raise served_error(error, mid_reply=False) from None
        return [ChatMessage(**m) for m in fitted["messages"]], fitted["dropped"]

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.model_name):
            raise APIError(404, f"The model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}.", param="model", code="model_not_found")

    def _check_text(self, text: str, param: str) -> str:
        return check_text(text, param, self.settings.max_prompt_chars)
