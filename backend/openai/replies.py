"""What the routes read from: a reply streaming from Textbot and its usage (for all three
APIs), and the Server-Sent Events the OpenAI chat and completions routes write."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from backend.openai.protocol import PromptTokensDetails, Usage
from backend.protocol import ReplyPiece


class Reply(Protocol):
    """A reply being generated: iterate it once for its pieces (`n` choices interleaved, each
    choice's last piece with its finish_reason)."""

    def __aiter__(self) -> AsyncIterator[ReplyPiece]: ...


class UsageCounter:
    """Token counts over the pieces of one or more prompts' replies."""

    def __init__(self):
        self.prompts: dict[int, tuple[int, int]] = {}  # prompt -> (prompt tokens, cached tokens)
        self.completions: dict[tuple[int, int], int] = {}  # (prompt, choice) -> completion tokens

    def count(self, piece: ReplyPiece, prompt: int = 0) -> None:
        self.prompts[prompt] = (piece.prompt_tokens, piece.cached_tokens)
        self.completions[prompt, piece.index] = piece.completion_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(p for p, _ in self.prompts.values())

    @property
    def cached_tokens(self) -> int:
        """Of the prompt tokens, those read from the replica's prefix cache."""
        return sum(c for _, c in self.prompts.values())

    @property
    def completion_tokens(self) -> int:
        return sum(self.completions.values())

    def usage(self) -> Usage:
        """As chat completions and completions report it."""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))


def event(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(error: Exception) -> str:
    reason = str(error) or type(error).__name__
    return event(json.dumps({"error": {"message": f"Generation failed: {reason}",
                                       "type": "server_error", "param": None, "code": None}}))


async def sse(payloads: AsyncIterator[str], usage: Callable[[], str] | None) -> AsyncIterator[str]:
    """OpenAI's stream: an event per payload, then the usage payload if asked for, then [DONE].
    A failure mid-stream ends it with an error event (the status line is long gone)."""
    try:
        async for payload in payloads:
            yield event(payload)
    except Exception as error:
        yield error_event(error)
        return
    if usage is not None:
        yield event(usage())
    yield event("[DONE]")
