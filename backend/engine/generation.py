"""A reply in flight, as its consumer sees it: iterate it for text pieces, or cancel it.

No torch here: the model replica's serving process holds Generations of an engine that
runs in a process of its own (process.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from backend.engine.protocol import ResolvedSampling, TokenLogprob


@dataclass
class Finished:
    reason: str  # "stop" (end of sequence), "length" (token budget, context or time cap), "cancelled", "error"
    error: BaseException | None = None
    stop_sequence: str | None = None  # the stop string that ended the reply, when one did


@dataclass
class Generation:
    """One request in flight. Iterate it once for its text pieces."""

    id: int
    prompt_tokens: int
    sampling: ResolvedSampling
    index: int = 0  # which of its prompt's replies (`submit_choices`)
    completion_tokens: int = 0  # sampled so far, by the decode loop
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    tokens_streamed: int = 0  # in the pieces yielded so far: the consumer's view, for its metrics
    finish_reason: str | None = None
    stop_sequence: str | None = None  # as Finished's
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens behind the last piece
    submitted: float = field(default_factory=time.monotonic)
    on_cancel: Callable[[], None] | None = field(default=None, repr=False)  # tells an engine elsewhere
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the decode loop to drop this request; it does so at its next step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self.on_cancel and self.finish_reason is None:
                self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, item) -> None:
        """A piece `(text, tokens_streamed, logprobs)` or the Finished end, from the engine."""
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, Finished):
                    self.finish_reason, self.stop_sequence = item.reason, item.stop_sequence
                    if item.error is not None:
                        raise item.error
                    return
                text, self.tokens_streamed, self.logprobs = item
                yield text
        finally:
            # Reached on normal end too (then a no-op), but above all when the consumer
            # goes away mid-stream: a closed stream must not keep burning the cores.
            self.cancel()


# How the decode loop hands a generation its next piece or its end (from the loop's thread).
Deliver = Callable[[Generation, object], None]


def to_event_loop(loop: asyncio.AbstractEventLoop) -> Deliver:
    """Deliver into the generation itself, waking its consumer on `loop` without polling."""

    def deliver(generation: Generation, item) -> None:
        try:
            loop.call_soon_threadsafe(generation.put, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            generation.cancel()

    return deliver
