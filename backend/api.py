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
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
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
from backend.protocol import ChatMessage, SamplingParams
from backend.routing import Models, RemoteReply, replica_cause
from backend.settings import TextbotSettings, deployment_name

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

log = logging.getLogger("ray.serve")

# How long the ingress reuses what Serve's controller said of each model's running replicas.
REPLICA_COUNT_TTL_S = 1.0
# A count this old is still answered at once (while a newer one is fetched); an older one waits.
REPLICA_COUNT_STALE_S = 5.0

# /health waits this long for a model replica to answer.
HEALTH_TIMEOUT_S = 5.0

# A refusal's HTTP status as a WebSocket close code: 1009 too big, 1007 bad data, 1013 try again later.
_WEBSOCKET_CLOSE = {413: 1009, 400: 1007, 503: 1013}


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
    def __init__(self, settings: TextbotSettings, textbots: list[DeploymentHandle]):
        self.settings = settings
        # One Textbot deployment per model, in the config's order: the first is the default.
        self.served = Models({model.served_name: handle for model, handle in zip(settings.models, textbots)})
        self.started = int(time.time())
        self.app_name = serve.get_replica_context().app_name
        self._cards: dict[str, dict] = {}  # what each model's replica said when last asked (ready)
        self._counted: tuple[float, dict[str, int]] | None = None  # (when, running replicas by model)
        self._counting: asyncio.Task | None = None  # the one fetch of them under way

    def model_names(self) -> list[str]:
        """The served models' names, the default first: for callers through a handle (the chat page)."""
        return self.served.names

    async def loaded_models(self) -> list[str]:
        """The served models with a running replica, for handle callers (the chat page says when a
        model is loading). Counted from Serve's controller: asking never wakes a sleeping model."""
        running = await self._replica_counts()
        return [name for name in self.served.names if running.get(name)]

    @api.post("/", response_class=StreamingResponse, summary="Stream a reply to one prompt")
    async def generate(
        self,
        prompt: Annotated[str, Query(description="The user's message.")],
        max_new_tokens: Annotated[int | None, Query(ge=1, le=8192)] = None,
        temperature: Annotated[float | None, Query(ge=0.0, le=2.0)] = None,
        top_p: Annotated[float | None, Query(gt=0.0, le=1.0)] = None,
        seed: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
        model: Annotated[str | None, Query(description="Which model answers; the default when left out.")] = None,
        session_id: SessionHeader = None,
    ) -> StreamingResponse:
        """The Ray Serve tutorial's endpoint: the reply as text/plain, piece by piece."""
        handle = self.served.handle(model)
        messages = [ChatMessage(role="user", content=prompt)]
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed)
        reply = RemoteReply(handle, "POST /", messages, sampling, session=session_id, param="prompt")
        pieces = await started(reply.text())
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8", headers=STREAM_HEADERS)

    @api.post("/v1/chat/completions", response_model=ChatCompletion,
              summary="OpenAI-compatible chat completions, streaming (SSE) or not")
    async def chat_completions(self, request: ChatCompletionRequest, session_id: SessionHeader = None):
        name = self.served.name(request.model)
        reply = self._reply(name, chat.reply_plan(request, session_id))
        if request.stream:
            pieces = await started(reply)
            return StreamingResponse(chat.sse_stream(request, pieces, name), media_type="text/event-stream",
                                     headers=STREAM_HEADERS | {DROPPED_HEADER: str(reply.dropped)})
        completion = await chat.complete(request, reply, name)
        return JSONResponse(completion.model_dump(), headers={DROPPED_HEADER: str(reply.dropped)})

    @api.post("/v1/responses", response_model=Response,
              summary="OpenAI Responses: text and function calls, streaming (typed SSE events) or not")
    async def create_response(self, request: ResponseRequest, session_id: SessionHeader = None):
        name = self.served.name(request.model)
        plan = responses.reply_plan(request, session_id)
        reply = self._reply(name, plan)
        if request.stream:
            pieces = await started(reply)
            return StreamingResponse(responses.sse_stream(request, plan, pieces, name), media_type="text/event-stream",
                                     headers=STREAM_HEADERS | {DROPPED_HEADER: str(reply.dropped)})
        response = await responses.respond(request, plan, reply, name)
        return JSONResponse(response.model_dump(mode="json", by_alias=True), headers={DROPPED_HEADER: str(reply.dropped)})

    @api.post("/v1/messages", response_model=Message,
              summary="Anthropic Messages: text and tool use, streaming (SSE events) or not")
    async def create_message(self, request: MessagesRequest, session_id: SessionHeader = None):
        name = self.served.name(request.model)
        plan = messages.reply_plan(request, session_id)
        reply = self._reply(name, plan)
        if request.stream:
            return StreamingResponse(messages.sse_stream(plan, await started(reply), name),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse((await messages.create(plan, reply, name)).model_dump(mode="json"))

    @api.post("/v1/messages/count_tokens", response_model=TokenCount,
              summary="Anthropic Messages: the prompt's tokens, tools and system prompt included")
    async def count_message_tokens(self, request: CountTokensRequest, session_id: SessionHeader = None) -> TokenCount:
        name = self.served.name(request.model)
        return TokenCount(input_tokens=await messages.count(self._reply(name, messages.count_plan(request, session_id))))

    @api.post("/v1/completions", response_model=Completion,
              summary="OpenAI-compatible (legacy) text completions, streaming (SSE) or not")
    async def completions(self, request: CompletionRequest, session_id: SessionHeader = None):
        name = self.served.name(request.model)
        sampling = completions.sampling(request)
        replies = [RemoteReply(self.served.handles[name], "POST /v1/completions", prompt, sampling, strict=True,
                               session=session_id, param="prompt") for prompt in request.prompts]
        if request.stream:
            replies = await asyncio.gather(*map(started, replies))
            return StreamingResponse(completions.sse_stream(request, replies, name),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse((await completions.complete(request, replies, name)).model_dump())

    @api.get("/v1/models", response_model=ModelList, summary="The served models")
    async def models(self) -> ModelList:
        """Every model, whether loaded or asleep; asking never wakes one (a sleeping model's
        replicas are counted, not called)."""
        awake = await self.loaded_models()
        asked = await asyncio.gather(*map(self._card, awake),
                                     return_exceptions=True)  # loading, restarting or gone: not loaded
        cards = {name: card for name, card in zip(awake, asked) if isinstance(card, dict)}
        listed = []
        for model in self.settings.models:
            name = model.served_name
            served = cards.get(name) or self._cards.get(name)
            card = ModelCard(id=name, created=self.started, loaded=cards.get(name) is not None,
                             quantization=model.quantization)
            if served:
                card.context_length = served["context_length"]
                card.engine, card.engine_reason = (("transformers", served["fallback"]) if served["fallback"]
                                                   else ("textbot", None))
            listed.append(card)
        return ModelList(data=listed)

    @api.websocket("/")
    async def chat_socket(self, ws: WebSocket, model: str | None = None) -> None:
        """The tutorial's WebSocket chat (`?model=` picks the model): each text frame is a user
        message; the reply streams back as text frames, then END_OF_REPLY. The connection keeps
        the conversation, trimmed from its oldest turns to fit the model's context."""
        await ws.accept()
        try:
            handle = self.served.handle(model)
        except APIError as error:
            return await _close(ws, 1008, error.message)
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
            conversation.append(ChatMessage(role="user", content=text))
            reply = RemoteReply(handle, "WebSocket /", conversation, SamplingParams(), session=session,
                                truncate=True, param="message")
            said = ""
            try:
                async for piece in reply.text():
                    said += piece
                    await ws.send_text(piece)
            except APIError as error:
                return await _close(ws, _WEBSOCKET_CLOSE.get(error.status, 1008), error.message)
            except GenerationError as error:
                return await _close(ws, 1011, str(error))
            # Kept as the model last read it: without the turns that no longer fit.
            conversation = [*conversation[reply.dropped:], ChatMessage(role="assistant", content=said)]
            await ws.send_text(END_OF_REPLY)

    @api.get("/health", summary="Ready when the default model's replica answers")
    async def health(self) -> dict:
        try:
            await self._card(self.served.default)
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            cause = replica_cause(error)
            raise APIError(503, f"No model replica is ready ({type(cause).__name__}: {cause}); "
                           "one may be loading or restarting.",
                           code="unavailable", headers={"Retry-After": RETRY_AFTER_S}) from None
        return {"status": "ok", "model": self.served.default}

    def _reply(self, name: str, plan: ReplyPlan) -> RemoteReply:
        """The one way every chat-like API's request reaches the model: the reply streaming from
        a replica of model `name`, which checks the text and drops the oldest turns if asked."""
        return RemoteReply(self.served.handles[name], plan.route, plan.messages, plan.sampling, strict=True,
                           session=plan.session, tools=plan.tool_use.for_prompt(), truncate=plan.truncate,
                           param=plan.param)

    async def _card(self, name: str) -> dict:
        """What a replica of model `name` says it serves (waits up to HEALTH_TIMEOUT_S)."""
        served = await asyncio.wait_for(self.served.handles[name].ready.remote(), HEALTH_TIMEOUT_S)
        self._cards[name] = served
        return served

    async def _replica_counts(self) -> dict[str, int]:
        """`_running_replicas`, asked of the controller at most once a second, one fetch at a time,
        and not waited for while the last count is under REPLICA_COUNT_STALE_S old: callers are
        /v1/models and the chat page (is a slow reply's model loading?), and a second's staleness
        tells them nothing wrong (a replica takes longer than that to start). Measured when the page
        asked before every reply: 8 chats starting at once each waited for a `serve.status()` of
        their own, and the page's time to first token was 2.1x the API's."""
        age = time.monotonic() - self._counted[0] if self._counted else float("inf")
        if age > REPLICA_COUNT_TTL_S and (self._counting is None or self._counting.done()):
            self._counting = asyncio.create_task(self._count_replicas())
        if age <= REPLICA_COUNT_STALE_S:  # being refreshed meanwhile
            return self._counted[1]
        return await asyncio.shield(self._counting)

    async def _count_replicas(self) -> dict[str, int]:
        try:
            counts = await asyncio.to_thread(self._running_replicas)
        except Exception:
            log.exception("Could not count the models' replicas")  # for a caller served the last count
            raise
        self._counted = (time.monotonic(), counts)
        return counts

    def _running_replicas(self) -> dict[str, int]:
        """Each model's running replicas, from Serve's controller (no request to the model)."""
        deployments = serve.status().applications[self.app_name].deployments
        counts = {}
        for name in self.served.names:
            status = deployments.get(deployment_name(name))
            counts[name] = status.replica_states.get("RUNNING", 0) if status else 0
        return counts
