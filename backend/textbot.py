"""The Textbot deployment: the model's replica. It has no HTTP routes of its own;
callers stream from it through a DeploymentHandle with `.options(stream=True)`:
the HTTP ingress (backend/api.py) and the chat page.

Keeping HTTP out of the replica that runs the model means a replica that dies
mid-reply leaves its clients' connections with the ingress, which tells them
so in their own protocol (an SSE error event, a WebSocket close 1011).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pydantic import TypeAdapter, ValidationError
from ray import serve

from backend.engine.prompt import is_conversation
from backend.errors import RETRY_AFTER_S, APIError, EngineBusyError, InvalidSamplingError, PromptTooLongError
from backend.metrics import ReplyMetrics
from backend.protocol import ChatMessage, ReplyPiece, ResolvedSampling, SamplingParams, ToolSpec, check_text
from backend.settings import ReplicaSettings
from backend.streams import merge

if TYPE_CHECKING:
    from backend.engine.generation import Generation

_messages = TypeAdapter(list[ChatMessage])


def _texts(prompt: list[ChatMessage] | str | list[int]) -> list[str]:
    """What a prompt says, to check: a conversation's messages (an assistant turn that only
    called tools may say nothing), or a text; token ids say nothing to check."""
    if isinstance(prompt, str):
        return [prompt]
    return [m.content for m in prompt if isinstance(m, ChatMessage) and not m.tool_calls]


@serve.deployment
class Textbot:
    def __init__(self, settings: ReplicaSettings):
        # The engine runs in a process of its own, so this process's event loop, streaming
        # the replies through Ray, does not slow its decode steps (backend/engine/process.py).
        # Nothing here imports torch.
        from backend.engine.process import EngineProcess

        self.settings = settings
        self.engine = EngineProcess(settings.model, settings.engine, settings.model.torch_threads)
        self.metrics = ReplyMetrics(settings.model.served_name)

    def __del__(self):
        if engine := getattr(self, "engine", None):  # absent if the model failed to load
            engine.shutdown()

    async def stream_reply(self, prompt: list[ChatMessage] | list[dict] | str | list[int], sampling: SamplingParams,
                           strict: bool = False, route: str = "handle", tools: list[ToolSpec] | None = None,
                           truncate: bool = False, param: str = "messages") -> AsyncIterator[ReplyPiece]:
        """The one way to a reply: the reply (or `sampling.n` replies, their pieces interleaved,
        each tagged with its index) with token counts. `prompt` is a conversation (which may call
        `tools`), a text or token ids; `route` names the caller's route in the request log.

        Every message's text is checked here (`param` names it in the error). `truncate` drops a
        conversation's oldest turns (never system messages or the last message) until it leaves
        room for the reply; every piece says how many went (`dropped`). `strict`: a token limit
        the caller asked for must fit in the context (OpenAI's rule), rather than being shortened.

        Raises APIError before the first piece if the request cannot be served;
        a failure while generating raises GenerationError from the stream.
        """
        try:
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                prompt = _messages.validate_python(prompt)
            if not isinstance(sampling, SamplingParams):
                sampling = SamplingParams.model_validate(sampling or {})
            for text in _texts(prompt):
                check_text(text, param, self.settings.max_prompt_chars)
        except ValidationError as exc:
            self.metrics.refused.inc(tags={"kind": "invalid_request"})
            error = exc.errors()[0]
            where = ".".join(map(str, error["loc"]))
            raise APIError(400, f"Invalid chat request: {where + ': ' if where else ''}{error['msg']}",
                           param=param) from None
        except APIError:
            self.metrics.refused.inc(tags={"kind": "invalid_request"})
            raise
        prompt = self._with_system_prompt(prompt)
        dropped = 0
        if truncate and is_conversation(prompt):
            prompt, dropped = await self._fit(prompt, sampling.max_new_tokens)
        generations = await self._start(prompt, sampling, strict, tools)
        async for piece in merge([self._pieces(generation, route, dropped) for generation in generations]):
            yield piece

    async def _pieces(self, generation: Generation, route: str, dropped: int) -> AsyncIterator[ReplyPiece]:
        def piece(text: str, finish_reason: str | None = None, logprobs=()) -> ReplyPiece:
            return ReplyPiece(text, generation.prompt_tokens, generation.tokens_streamed, finish_reason,
                              generation.cached_tokens, generation.index, tuple(logprobs), dropped=dropped)

        async for text in self._observed(generation, route):
            yield piece(text, logprobs=generation.logprobs)
        yield dataclasses.replace(piece("", generation.finish_reason), stop_sequence=generation.stop_sequence,
                                  completion_tokens=generation.completion_tokens)

    def _with_system_prompt(self, prompt: list[ChatMessage] | str | list[int]) -> list[ChatMessage] | str | list[int]:
        system_prompt = self.settings.generation.system_prompt
        if system_prompt and is_conversation(prompt) and not any(m.role == "system" for m in prompt):
            return [ChatMessage(role="system", content=system_prompt), *prompt]
        return prompt

    async def _fit(self, conversation: list[ChatMessage], max_new_tokens: int | None) -> tuple[list[ChatMessage], int]:
        """The conversation without its oldest turns until it leaves room for the reply, and how many went."""
        context = self.engine.context_length
        reply_room = min(max_new_tokens or self.settings.generation.max_new_tokens, context // 2)
        return await self.engine.fit(conversation, context - reply_room)

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace the replica."""
        if problem := self.engine.problem():
            raise RuntimeError(problem)
        self._report()  # keeps the gauges reported while idle

    def ready(self) -> dict:
        """For the ingress's /health and /v1/models: the model as this replica serves it, once it can."""
        self.check_health()
        return {"model": self.engine.name, "context_length": self.engine.context_length,
                "fallback": self.engine.fallback}

    async def stats(self) -> dict:
        """This replica's generations in flight, prefix cache and resident memory (its own
        process's and its engine's): for operators and benchmarks."""
        from backend.engine.process import resident_bytes

        now = await self.engine.stats()
        return {"running": now["running"], "waiting": now["in_flight"] - now["running"],
                "prefix_cache": now["prefix_cache"], "kv": now["kv"],
                "rss_mb": round((resident_bytes() + now["rss"]) / 2**20, 1),
                "engine_rss_mb": round(now["rss"] / 2**20, 1)}

    def _observed(self, generation: Generation, route: str) -> AsyncIterator[str]:
        return self.metrics.observe(generation, generation.submitted, route, self._report)

    def _report(self) -> None:
        self.metrics.set_load(*self._load())
        if stats := self.engine.prefix_cache_stats:
            self.metrics.set_prefix_cache(stats)
        self.metrics.set_memory(*self.engine.memory)

    def _load(self) -> tuple[int, int]:
        running = self.engine.running
        return running, self.engine.in_flight - running

    async def _start(self, prompt: list[ChatMessage] | str | list[int], params: SamplingParams, strict: bool = False,
               tools: list[ToolSpec] | None = None) -> list[Generation]:
        """Submit to the engine with defaults filled in. `strict`: a token limit the caller
        asked for must fit in the context (OpenAI's rule), rather than being shortened."""
        defaults = self.settings.generation
        sampling = ResolvedSampling(
            max_new_tokens=params.max_new_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if params.temperature is None else params.temperature,
            top_p=params.top_p or defaults.top_p,
            top_k=params.top_k,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=params.logit_bias,
            stop=tuple(params.stop or ()),
            logprobs=params.logprobs,
            output_schema=params.output_schema,
        )
        try:
            return await self.engine.submit_choices(prompt, sampling, params.n, tools=tools,
                                                    shorten=not (strict and params.max_new_tokens))
        except PromptTooLongError as exc:
            self.metrics.refused.inc(tags={"kind": "context_length_exceeded"})
            raise APIError(400, str(exc), param="messages" if isinstance(prompt, list) else "prompt",
                           code="context_length_exceeded") from None
        except InvalidSamplingError as exc:
            self.metrics.refused.inc(tags={"kind": "invalid_request"})
            raise APIError(400, str(exc), param=exc.param) from None
        except EngineBusyError as exc:
            self.metrics.refused.inc(tags={"kind": "overloaded"})
            raise APIError(503, str(exc), code="overloaded", headers={"Retry-After": RETRY_AFTER_S}) from None
