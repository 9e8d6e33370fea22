"""The Textbot deployment: the model's replica. It has no HTTP routes of its own;
callers stream from it through a DeploymentHandle with `.options(stream=True)`:
the HTTP ingress (backend/api.py) and the chat page.

Keeping HTTP out of the replica that runs the model means a replica that dies
mid-reply leaves its clients' connections with the ingress, which tells them
so in their own protocol (an SSE error event, a WebSocket close 1011).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import TypeAdapter, ValidationError
from ray import serve

from backend import model
from backend.conversation import fit_to_context
from backend.engine import Engine, EngineBusyError, Generation, PromptTooLongError
from backend.errors import RETRY_AFTER_S, APIError
from backend.protocol import ChatMessage, ReplyPiece, ResolvedSampling, SamplingParams, check_text
from backend.settings import TextbotSettings

_messages = TypeAdapter(list[ChatMessage])


@serve.deployment
class Textbot:
    def __init__(self, settings: TextbotSettings):
        self.settings = settings
        loaded = model.load(settings.model)
        limits = settings.engine
        self.engine = Engine(loaded, settings.model.torch_threads, max_running=limits.max_running,
                             max_waiting=limits.max_waiting, max_seconds=limits.max_seconds)

    def __del__(self):
        if engine := getattr(self, "engine", None):  # absent if the model failed to load
            engine.shutdown()

    async def stream_reply(self, messages: list[ChatMessage], sampling: SamplingParams,
                           strict: bool = False) -> AsyncIterator[ReplyPiece]:
        """The reply with its token counts, for the HTTP ingress (already validated there).

        Raises APIError before the first piece if the request cannot be served;
        a failure while generating raises GenerationError from the stream.
        """
        generation = self._start(messages, sampling, strict)
        async for text in generation:
            yield ReplyPiece(text, generation.prompt_tokens, generation.completion_tokens)
        yield ReplyPiece("", generation.prompt_tokens, generation.completion_tokens, generation.finish_reason)

    async def stream_chat(
        self, messages: list[dict] | list[ChatMessage], sampling: dict | SamplingParams | None = None
    ) -> AsyncIterator[str]:
        """Stream the reply to a conversation as text pieces (the chat page's source).

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
            check_text(message.content, "content", self.settings.max_prompt_chars)
        async for piece in self._start(conversation, params):
            yield piece

    async def fit_conversation(self, messages: list[dict] | list[ChatMessage],
                               max_new_tokens: int | None = None) -> dict:
        """Drop a conversation's oldest turns (never system messages or the last message) until
        it leaves room for the reply. Returns {"messages": [...], "dropped": n}."""
        conversation = _messages.validate_python(messages)
        context = self.engine.context_length
        reply_room = min(max_new_tokens or self.settings.generation.max_new_tokens, context // 2)
        fitted, dropped = fit_to_context(conversation, self.engine.count_prompt_tokens, context - reply_room)
        return {"messages": [m.model_dump() for m in fitted], "dropped": dropped}

    def stats(self) -> dict:
        """Generations in flight in this replica: for operators and tests."""
        running = self.engine.running
        return {"running": running, "waiting": self.engine.in_flight - running}

    def model_name(self) -> str:
        return self.engine.loaded.name

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
