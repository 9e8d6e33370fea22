"""The generation engine: a request in, an async stream of text pieces out, cancellable.

Its whole interface is `Engine.submit(messages, sampling) -> Generation`, then
`async for piece in generation` and `generation.cancel()`. Today each request
decodes on a thread of a small pool (`max_running` at once, `max_waiting` more
queued, the rest refused with EngineBusyError); the loop is small enough to
read in one go:
`prefill`/`decode_step` run the model, `sample` picks a token, `_generate`
strings them together and hands text to the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from backend.detokenizer import IncrementalDetokenizer
from backend.errors import GenerationError
from backend.model import LoadedModel, encode_chat
from backend.protocol import ChatMessage, ResolvedSampling

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the model's context for a reply."""


class EngineBusyError(RuntimeError):
    """Every generation slot and waiting place is taken; try again shortly."""


@dataclass
class _Finished:
    reason: str  # "stop" (end of sequence), "length" (token budget, context or time cap), "cancelled"
    error: BaseException | None = None


@dataclass
class Generation:
    """One request in flight. Iterate it once for its text pieces."""

    id: int
    prompt_tokens: int
    sampling: ResolvedSampling
    completion_tokens: int = 0
    finish_reason: str | None = None
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the decode loop to stop; it does so before its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Finished):
                    self.finish_reason = item.reason
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            # Reached on normal end too (then a no-op), but above all when the consumer
            # goes away mid-stream: a closed stream must not keep burning the cores.
            self.cancel()


class Engine:
    def __init__(self, loaded: LoadedModel, torch_threads: int | None = None, max_running: int = 2,
                 max_waiting: int = 16, max_seconds: float | None = None):
        self.loaded = loaded
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.max_running, self.max_waiting, self.max_seconds = max_running, max_waiting, max_seconds
        # The pool's own queue holds the waiting generations.
        self._pool = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="generation")
        self._ids = itertools.count(1)
        self._pending: dict[int, Generation] = {}  # queued or running
        self._running = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Generations not yet finished: running, or waiting for a slot."""
        with self._lock:
            return len(self._pending)

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    def shutdown(self) -> None:
        """Cancel everything in flight, so a stopping replica does not wait on it."""
        with self._lock:
            for generation in self._pending.values():
                generation.cancel()
        self._pool.shutdown(wait=False, cancel_futures=False)

    def count_prompt_tokens(self, messages: list[ChatMessage]) -> int:
        return len(encode_chat(self.loaded.tokenizer, messages))

    def submit(self, messages: list[ChatMessage], sampling: ResolvedSampling, shorten: bool = True) -> Generation:
        """Start generating a reply to `messages`. Call from the event loop.

        A reply that would overflow the context is cut at its end when `shorten`,
        refused otherwise; a prompt that fills the context is always refused.
        """
        prompt_ids = encode_chat(self.loaded.tokenizer, messages)
        room = self.context_length - len(prompt_ids)
        if room < 1 or (not shorten and sampling.max_new_tokens > room):
            raise PromptTooLongError(
                f"The conversation is {len(prompt_ids)} tokens and the reply may take up to "
                f"{sampling.max_new_tokens}; the model's context holds {self.context_length}. "
                "Shorten the conversation or ask for fewer tokens."
            )
        generation = Generation(id=next(self._ids), prompt_tokens=len(prompt_ids), sampling=sampling)
        with self._lock:
            if len(self._pending) >= self.max_running + self.max_waiting:
                raise EngineBusyError(
                    f"All {self.max_running} generation slots and {self.max_waiting} waiting places are "
                    "taken. Try again in a few seconds."
                )
            self._pending[generation.id] = generation
        budget = min(sampling.max_new_tokens, room)
        self._pool.submit(self._generate, generation, prompt_ids, budget, asyncio.get_running_loop())
        return generation

    def _generate(self, generation: Generation, prompt_ids: list[int], budget: int, loop) -> None:
        def hand_over(item) -> None:
            # Wakes the consumer without polling; the loop may be gone at shutdown.
            try:
                loop.call_soon_threadsafe(generation._queue.put_nowait, item)
            except RuntimeError:
                generation.cancel()

        detokenizer = IncrementalDetokenizer(self.loaded.tokenizer)
        finished = _Finished("length")
        with self._lock:
            self._running += 1
        try:
            for token_id in self._tokens(prompt_ids, generation.sampling, budget, generation._cancelled):
                if token_id in self.loaded.eos_token_ids:
                    finished = _Finished("stop")
                    break
                generation.completion_tokens += 1
                if piece := detokenizer.push(token_id):
                    hand_over(piece)
            if generation.cancelled:
                finished = _Finished("cancelled")
            elif tail := detokenizer.flush():
                hand_over(tail)
        except Exception as exc:  # reaches the consumer as the stream's error
            log.exception("Generation %d failed", generation.id)
            failure = GenerationError(f"The model failed while generating ({type(exc).__name__}: {exc}).")
            finished = _Finished("error", failure)
        finally:
            with self._lock:
                self._running -= 1
                self._pending.pop(generation.id, None)
            hand_over(finished)

    @torch.inference_mode()
    def _tokens(
        self, prompt_ids: list[int], sampling: ResolvedSampling, budget: int, stop: threading.Event
    ) -> Iterator[int]:
        if stop.is_set():  # cancelled while it waited for a slot
            return
        model = self.loaded.model
        rng = torch.Generator()
        rng.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        deadline = time.monotonic() + self.max_seconds if self.max_seconds else float("inf")
        logits, cache = prefill(model, prompt_ids)
        for step in range(budget):
            if stop.is_set() or time.monotonic() > deadline:
                return
            token_id = sample(logits, sampling, rng)
            yield token_id
            if step + 1 < budget:
                logits, cache = decode_step(model, token_id, cache)


def prefill(model, prompt_ids: list[int]):
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    return out.logits[0, -1], out.past_key_values


def decode_step(model, token_id: int, cache):
    out = model(input_ids=torch.tensor([[token_id]]), past_key_values=cache, use_cache=True)
    return out.logits[0, -1], out.past_key_values


def sample(logits: torch.Tensor, sampling: ResolvedSampling, rng: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, then nucleus (top-p) sampling."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        outside[0] = False  # a top_p below float32's smallest value rounds to 0 and would drop all
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=rng))
