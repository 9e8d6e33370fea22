"""The Textbot Serve deployment: the model's replica, its HTTP routes under /api,
and `stream_chat`, the handle method other deployments (the chat page) stream from.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of
# this class through serve.ingress and cannot resolve string annotations there.
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from ray import serve

from backend import model
from backend.auth import BearerKeyMiddleware
from backend.conversation import fit_to_context
from backend.engine import Engine, EngineBusyError, Generation, GenerationError, PromptTooLongError
from backend.errors import APIError, install_error_handlers
from backend.limits import install_body_limit
from backend.openai_protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList
from backend.openai_serving import CompletionText, complete, sse_stream
from backend.protocol import ChatMessage, ResolvedSampling, SamplingParams
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

_messages = TypeAdapter(list[ChatMessage])

# How many of the oldest messages `truncation: "auto"` dropped to fit the context.
DROPPED_HEADER = "X-Textbot-Dropped-Messages"

# Seconds a refused client should wait; a reply of the default length takes about this long.
RETRY_AFTER_S = "5"

# The Ray Serve tutorial's WebSocket protocol: this frame ends each reply.
END_OF_REPLY = "<<Response Finished>>"


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    # A close frame's reason is limited to 123 bytes of UTF-8.
    await ws.close(code, reason.encode()[:123].decode(errors="ignore"))


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if first:
        yield first
    async for piece in rest:
        yield piece


# Module-level helpers the class uses stay above it: Serve ships the ingress class
# to replicas by value, and a helper defined below it was missing there (NameError).
@serve.deployment
@serve.ingress(api)
class Textbot:
    def __init__(self, settings: TextbotSettings):
        self.settings = settings
        loaded = model.load(settings.model)
        limits = settings.engine
        self.engine = Engine(loaded, settings.model.torch_threads, max_running=limits.max_running,
                             max_waiting=limits.max_waiting, max_seconds=limits.max_seconds)
        self.started = int(time.time())

    def __del__(self):
        if engine := getattr(self, "engine", None):  # absent if the model failed to load
            engine.shutdown()

    # ---- HTTP routes ---------------------------------------------------------

    @api.post("/", response_class=StreamingResponse, summary="Stream a reply to one prompt")
    async def generate(
        self,
        prompt: Annotated[str, Query(description="The user's message.")],
        max_new_tokens: Annotated[int | None, Query(ge=1, le=8192)] = None,
        temperature: Annotated[float | None, Query(ge=0.0, le=2.0)] = None,
        top_p: Annotated[float | None, Query(gt=0.0, le=1.0)] = None,
        seed: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
    ) -> StreamingResponse:
        """The Ray Serve tutorial's endpoint: the reply as text/plain, piece by piece."""
        messages = [ChatMessage(role="user", content=self._check_text(prompt, "prompt"))]
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed)
        pieces = aiter(self._start(messages, sampling))
        # Wait for the first piece before sending the status line: a generation that
        # fails at once is then a 500 with a message, not a 200 cut short.
        first = await anext(pieces, "")
        return StreamingResponse(
            _chain(first, pieces), media_type="text/plain; charset=utf-8", headers=STREAM_HEADERS
        )

    @api.post("/v1/chat/completions", response_model=ChatCompletion,
              summary="OpenAI-compatible chat completions, streaming (SSE) or not")
    async def chat_completions(self, request: ChatCompletionRequest):
        name = self.engine.loaded.name
        if request.model not in (None, name):
            raise APIError(404, f"The model {request.model!r} does not exist; this server serves {name!r}.",
                           param="model", code="model_not_found")
        messages = [m.to_chat() for m in request.messages]
        for message in messages:
            self._check_text(message.content, "messages")
        dropped = 0
        if request.truncation == "auto":
            messages, dropped = self._fit(messages, request.token_limit)
        sampling = SamplingParams(max_new_tokens=request.token_limit, temperature=request.temperature,
                                  top_p=request.top_p, seed=request.seed)
        text = CompletionText(self._start(messages, sampling, strict=True), request.stop_strings)
        headers = {DROPPED_HEADER: str(dropped)}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(sse_stream(text, name, include_usage), media_type="text/event-stream",
                                     headers=STREAM_HEADERS | headers)
        return JSONResponse((await complete(text, name)).model_dump(), headers=headers)

    @api.get("/v1/models", response_model=ModelList, summary="The served model")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.engine.loaded.name, created=self.started)])

    @api.websocket("/")
    async def chat_socket(self, ws: WebSocket) -> None:
        """The tutorial's WebSocket chat: each text frame is a user message; the reply
        streams back as text frames, then END_OF_REPLY. The connection keeps the
        conversation, trimmed from its oldest turns to fit the model's context."""
        await ws.accept()
        conversation: list[ChatMessage] = []
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
            conversation.append(ChatMessage(role="user", content=text))
            conversation, _ = self._fit(conversation)
            reply = ""
            try:
                async for piece in self._start(conversation, SamplingParams()):
                    reply += piece
                    await ws.send_text(piece)
            except APIError as error:  # 1013: "try again later"
                return await _close(ws, 1013 if error.status == 503 else 1008, error.message)
            except GenerationError as error:
                return await _close(ws, 1011, str(error))
            conversation.append(ChatMessage(role="assistant", content=reply))
            await ws.send_text(END_OF_REPLY)

    @api.get("/health", summary="Ready when the model is loaded")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.engine.loaded.name}

    # ---- Handle API ----------------------------------------------------------

    async def stream_chat(
        self, messages: list[dict] | list[ChatMessage], sampling: dict | SamplingParams | None = None
    ) -> AsyncIterator[str]:
        """Stream the reply to a conversation. Call through a handle with `.options(stream=True)`.

        Before the first piece, raises ValueError for a malformed conversation or
        parameters, and APIError (its `status` and `message` are HTTP's) for one that
        cannot be served: empty or too long, beyond the context, or the replica busy (503).
        """
        try:
            conversation = _messages.validate_python(messages)
            params = SamplingParams.model_validate(sampling or {})
        except ValidationError as exc:
            raise ValueError(f"Invalid chat request: {exc.errors()[0]['msg']}") from None
        for message in conversation:
            self._check_text(message.content, "content")
        generation = self._start(conversation, params)
        async for piece in generation:
            yield piece

    async def fit_conversation(self, messages: list[dict], max_new_tokens: int | None = None) -> dict:
        """Drop a conversation's oldest turns (never system messages or the last message) until
        it leaves room for the reply. Returns {"messages": [...], "dropped": n}."""
        conversation = _messages.validate_python(messages)
        fitted, dropped = self._fit(conversation, max_new_tokens)
        return {"messages": [m.model_dump() for m in fitted], "dropped": dropped}

    def stats(self) -> dict:
        """Generations in flight in this replica: for operators and tests."""
        running = self.engine.running
        return {"running": running, "waiting": self.engine.in_flight - running}

    # ---- Shared --------------------------------------------------------------

    def _start(self, messages: list[ChatMessage], params: SamplingParams, strict: bool = False) -> Generation:
        """Submit to the engine with defaults filled in. `strict`: a token limit the caller
        asked for must fit in the context (OpenAI's rule), rather than being shortened."""
        defaults = self.settings.generation
        if defaults.system_prompt and not any(m.role == "system" for m in messages):
            messages = [ChatMessage(role="system", content=defaults.system_prompt), *messages]
        sampling = ResolvedSampling(
            max_new_tokens=params.max_new_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if params.temperature is None else params.temperature,
            top_p=params.top_p or defaults.top_p,
            seed=params.seed,
        )
        try:
            return self.engine.submit(messages, sampling, shorten=not (strict and params.max_new_tokens))
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except EngineBusyError as exc:
            raise APIError(503, str(exc), code="overloaded", headers={"Retry-After": RETRY_AFTER_S}) from None

    def _fit(self, messages: list[ChatMessage], max_new_tokens: int | None = None) -> tuple[list[ChatMessage], int]:
        context = self.engine.context_length
        reply_room = min(max_new_tokens or self.settings.generation.max_new_tokens, context // 2)
        return fit_to_context(messages, self.engine.count_prompt_tokens, context - reply_room)

    def _check_text(self, text: str, param: str) -> str:
        if not text.strip():
            raise APIError(400, f"'{param}' is empty: send the text to reply to.", param=param)
        limit = self.settings.max_prompt_chars
        if len(text) > limit:
            raise APIError(413, f"'{param}' is {len(text)} characters; the limit is {limit}.",
                           param=param, code="prompt_too_long")
        return text
