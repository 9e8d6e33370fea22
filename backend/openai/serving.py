"""Turning a reply into OpenAI's chat-completion responses: stop strings,
Server-Sent Event chunks, and the non-streaming completion."""

import json
from collections.abc import AsyncIterator
from typing import Protocol
from backend.openai.protocol import (
    CompletionHeader,
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, PromptTokensDetails, Usage,
)


class Reply(Protocol):
    """A reply being generated: iterate it once for text pieces; cancellable; counts its tokens."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    def cancel(self) -> None: ...


class StopStrings:
    """Cuts the text before the first stop string, which never reaches the client.

    Text that could be the start of a stop string is held back until the next
    piece shows whether it is one.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns the text that is safe to send, and whether a stop string was hit."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class CompletionText:
    """A reply's text with stop strings applied; iterate once, then read finish_reason."""

    def __init__(self, reply: Reply, stops: list[str]):
        self.reply = reply
        self.stops = StopStrings(stops)
        self.finish_reason: str | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        async for piece in self.reply:
            text, stopped = self.stops.push(piece)
            if text:
                yield text
            if stopped:
                self.reply.cancel()
                self.finish_reason = "stop"
                return
        if tail := self.stops.flush():
            yield tail
        self.finish_reason = self.reply.finish_reason

    def usage(self) -> Usage:
        g = self.reply
        return Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                     total_tokens=g.prompt_tokens + g.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=g.cached_tokens))


def _event(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(text: CompletionText, model: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's streaming format: a role chunk, content chunks, a finish chunk,
    optionally a usage chunk, then [DONE]. A failure mid-stream is an error event."""
    header = CompletionHeader(model=model).model_dump()  # one id and timestamp for every chunk

    def chunk(delta: Delta, finish_reason=None) -> str:
        return _event(ChatCompletionChunk(**header, choices=[
            ChunkChoice(delta=delta, finish_reason=finish_reason)]).model_dump_json())

    yield chunk(Delta(role="assistant", content=""))
    try:
        async for piece in text:
            yield chunk(Delta(content=piece))
    except Exception as error:  # headers are gone: the error travels as an event
        reason = str(error) or type(error).__name__
        yield _event(json.dumps({"error": {"message": f"Generation failed: {reason}",
                                           "type": "server_error", "param": None, "code": None}}))
        return
    yield chunk(Delta(), text.finish_reason)
    if include_usage:
        yield _event(ChatCompletionChunk(**header, choices=[], usage=text.usage()).model_dump_json())
    yield _event("[DONE]")


async def complete(text: CompletionText, model: str) -> ChatCompletion:
    content = "".join([piece async for piece in text])
    return ChatCompletion(model=model, usage=text.usage(), choices=[
        Choice(message=AssistantMessage(content=content), finish_reason=text.finish_reason)])
