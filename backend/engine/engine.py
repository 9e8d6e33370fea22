"""The generation engine: a request in, an async stream of text pieces out, cancellable.

Its whole interface is `Engine.submit(messages, sampling) -> Generation`, then
`async for piece in generation` and `generation.cancel()`.

Inside, one decode loop per engine runs continuous (iteration-level) batching.
At every step it admits waiting requests (each takes its prompt's longest prefix
the prefix cache holds, so a conversation's next turn reads only its new tokens),
reads up to `prefill_chunk` tokens of their prompts (short ones together in one
forward pass, a long one a chunk at a time; a prompt read to its end joins the
batch), runs one forward pass that decodes a token for every running request, and
retires finished and cancelled requests at once, keeping their keys and values in
the prefix cache. So nobody waits for a partner, for the longest reply, or for a
long prompt to be read. The loop reads top to bottom in `_run` -> `_admit` /
`_read_prompts` / `Batch.step` -> `_advance`; the tensors live in `slots.py`
(the lean path for Llama models) or `batch.py` (any other, through Hugging Face's forward).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from backend.engine import batch as generic_path, slots
from backend.engine.detokenizer import IncrementalDetokenizer
from backend.errors import EngineBusyError, GenerationError, InvalidSamplingError, PromptTooLongError
from backend.engine.loading import LoadedModel
from backend.engine.prefix_cache import PrefixCache
from backend.engine.prompt import encode_chat
from backend.engine.sampling import sample
from backend.protocol import ChatMessage, ResolvedSampling
from backend.settings import EngineSettings

log = logging.getLogger(__name__)


@dataclass
class _Finished:
    reason: str  # "stop" (end of sequence), "length" (token budget, context or time cap), "cancelled", "error"
    error: BaseException | None = None


@dataclass
class Generation:
    """One request in flight. Iterate it once for its text pieces."""

    id: int
    prompt_tokens: int
    sampling: ResolvedSampling
    completion_tokens: int = 0  # sampled so far, by the decode loop
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    tokens_streamed: int = 0  # in the pieces yielded so far: the consumer's view, for its metrics
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the decode loop to drop this request; it does so at its next step."""
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
                text, self.tokens_streamed = item
                yield text
        finally:
            # Reached on normal end too (then a no-op), but above all when the consumer
            # goes away mid-stream: a closed stream must not keep burning the cores.
            self.cancel()


@dataclass
class _Request:
    """A submitted generation and what the loop needs to run it."""

    generation: Generation
    prompt_ids: list[int]
    budget: int  # new tokens allowed: the request's limit, cut to the room left in the context
    loop: asyncio.AbstractEventLoop
    rng: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    deadline: float = float("inf")
    running: bool = False  # admitted to the batch
    length: int = 0  # tokens of this request in the KV cache (its prompt's, once read)
    next_token: int = 0  # sampled and streamed, fed to the model at the next step
    sampled: list[int] = field(default_factory=list)  # the reply's token ids so far
    outcome: str | None = None  # the finish reason, once finished

    @property
    def cached_ids(self) -> list[int]:
        """The token ids whose keys and values the KV cache holds for this request."""
        return (self.prompt_ids + self.sampled)[:self.length]

    def hand_over(self, item) -> None:
        # Wakes the consumer without polling; its event loop may be gone at shutdown.
        try:
            self.loop.call_soon_threadsafe(self.generation._queue.put_nowait, item)
        except RuntimeError:
            self.generation.cancel()


class Engine:
    def __init__(self, loaded: LoadedModel, limits: EngineSettings = EngineSettings(), torch_threads: int | None = None):
        self.loaded = loaded
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.limits = limits
        # The tensors of batching: the lean slot path for the architectures it knows, else
        # Hugging Face's forward. Both have read_whole, PromptReader, Batch and Rows.
        self.path = slots if slots.supports(loaded.model) else generic_path
        # Keys and values of finished requests, for the next turn of their conversation.
        self.prefix_cache = (PrefixCache(int(limits.prefix_cache_mb * 2**20))
                             if self.path is slots and limits.prefix_cache_mb else None)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # signalled on submit and shutdown
        self._waiting: collections.deque[_Request] = collections.deque()
        self._pending = 0  # waiting or running
        self._running = 0
        self._stopped = False
        self._last_step = time.monotonic()  # when the loop last finished a step or went idle
        self._loop = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._loop.start()

    @property
    def in_flight(self) -> int:
        """Generations not yet finished: running, or waiting for a place in the batch."""
        with self._lock:
            return self._pending

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    def problem(self) -> str | None:
        """Why the engine cannot serve, or None: its decode loop died, or has work but
        finished no step for `max_stall_seconds` (wedged). For Serve's health check."""
        if not self._loop.is_alive():
            return "The decode loop is not running."
        with self._lock:
            stalled = time.monotonic() - self._last_step if self._pending else 0.0
        if stalled > self.limits.max_stall_seconds:
            return f"The decode loop has finished no step for {stalled:.1f} s with requests in flight."
        return None

    def shutdown(self) -> None:
        """Stop the loop; everything in flight ends as cancelled."""
        with self._work:
            self._stopped = True
            self._work.notify()

    def count_prompt_tokens(self, messages: list[ChatMessage]) -> int:
        return len(encode_chat(self.loaded.tokenizer, messages))

    def submit(self, messages: list[ChatMessage], sampling: ResolvedSampling, shorten: bool = True) -> Generation:
        """Start generating a reply to `messages`. Call from the event loop.

        A reply that would overflow the context is cut at its end when `shorten`,
        refused otherwise; a prompt that fills the context is always refused.
        """
        if sampling.logit_bias and (outside := [i for i in sampling.logit_bias
                                                if not 0 <= i < self.loaded.model.config.vocab_size]):
            raise InvalidSamplingError(f"logit_bias names token ids outside the vocabulary (0 to "
                                       f"{self.loaded.model.config.vocab_size - 1}): {outside[:5]}.")
        prompt_ids = encode_chat(self.loaded.tokenizer, messages)
        room = self.context_length - len(prompt_ids)
        if room < 1 or (not shorten and sampling.max_new_tokens > room):
            raise PromptTooLongError(
                f"The conversation is {len(prompt_ids)} tokens and the reply may take up to "
                f"{sampling.max_new_tokens}; the model's context holds {self.context_length}. "
                "Shorten the conversation or ask for fewer tokens."
            )
        generation = Generation(id=next(self._ids), prompt_tokens=len(prompt_ids), sampling=sampling)
        request = _Request(generation, prompt_ids, min(sampling.max_new_tokens, room), asyncio.get_running_loop(),
                           length=len(prompt_ids))
        with self._work:
            if self._pending >= self.limits.max_running + self.limits.max_waiting:
                raise EngineBusyError(
                    f"All {self.limits.max_running} generation slots and {self.limits.max_waiting} waiting places are "
                    "taken. Try again in a few seconds."
                )
            self._pending += 1
            self._waiting.append(request)
            self._work.notify()
        return generation

    # ---- The decode loop (its own thread) -------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        batch = self._new_batch()
        reading: collections.deque = collections.deque()  # admitted, prompt still being read
        while True:
            with self._work:
                while not (self._waiting or reading or batch.requests or self._stopped):
                    self._work.wait()
                    self._last_step = time.monotonic()
                if self._stopped:
                    break
                room = self.limits.max_running - len(batch.requests) - len(reading)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._running += len(admitted)
                for request in admitted:
                    request.running = True
            reading.extend(filter(None, map(self._admit, admitted)))
            try:
                self._read_prompts(reading, batch)
                if batch.requests:
                    logits = batch.step()
                    going_on = [self._advance(r, row) for r, row in zip(batch.requests, logits)]
                    self._remember(batch, [r for r, going in zip(batch.requests, going_on) if not going])
                    batch.keep([r for r, going in zip(batch.requests, going_on) if going])
            except Exception as exc:  # a failed forward pass fails the whole batch, not the loop
                self._fail(batch.requests, exc, "Decode step")
                batch = self._new_batch()
            with self._lock:
                self._last_step = time.monotonic()
        for request in [*batch.requests, *(prompt.request for prompt in reading), *self._waiting]:
            self._finish(request, _Finished("cancelled"))

    def _new_batch(self):
        return self.path.Batch(self.loaded.model, self.limits.max_running)

    def _admit(self, request: _Request):
        sampling = request.generation.sampling
        if request.generation.cancelled:  # the client left while it waited
            self._finish(request, _Finished("cancelled"))
            return None
        request.rng = torch.Generator()
        request.rng.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        request.detokenizer = IncrementalDetokenizer(self.loaded.tokenizer)
        request.deadline = time.monotonic() + self.limits.max_seconds if self.limits.max_seconds else float("inf")
        prefix = self.prefix_cache.lookup(request.prompt_ids) if self.prefix_cache else None
        request.generation.cached_tokens = prefix.length if prefix else 0
        return self.path.PromptReader(self.loaded.model, request, prefix)

    def _read_prompts(self, reading: collections.deque, batch) -> None:
        """Read at most `prefill_chunk` prompt tokens in this step, oldest prompt first: those
        not yet started that fit whole go together in one forward pass; what is left of the
        budget reads the next prompt a chunk further. Prompts read to their end join the batch."""
        for prompt in [p for p in reading if p.request.generation.cancelled]:
            reading.remove(prompt)
            prompt.finish()
            self._finish(prompt.request, _Finished("cancelled"))
        budget = self.limits.prefill_chunk
        whole = []
        while reading and not reading[0].started and reading[0].remaining <= budget:
            budget -= reading[0].remaining
            whole.append(reading.popleft())
        if whole:
            try:
                self._join(batch, self.path.read_whole(self.loaded.model, whole))
            except Exception as exc:  # fails these requests only
                for prompt in whole:
                    prompt.finish()
                self._fail([prompt.request for prompt in whole], exc, "Prefill")
        if reading and budget > 0:
            prompt = reading[0]
            try:
                prompt.read(budget)
            except Exception as exc:
                reading.popleft()
                prompt.finish()
                return self._fail([prompt.request], exc, "Prefill")
            if prompt.done:
                reading.popleft()
                self._join(batch, prompt.rows())

    def _join(self, batch, rows) -> None:
        """Sample each read prompt's first token; those that go on decoding join the batch."""
        going_on = [self._advance(request, logits) for request, logits in zip(rows.requests, rows.logits)]
        self._remember(rows, [r for r, going in zip(rows.requests, going_on) if not going])
        if any(going_on):
            batch.add(rows.select(going_on))

    def _remember(self, holder, retired: list[_Request]) -> None:
        """Keep the keys and values of requests that end here (`holder`: the batch or read
        prompts holding them) for their conversation's next turn, unless they failed."""
        if self.prefix_cache is None:
            return
        for request in retired:
            if request.outcome != "error":
                self.prefix_cache.store(request.cached_ids, *holder.columns(request))

    def _fail(self, requests: list[_Request], exc: Exception, what: str) -> None:
        log.exception("%s of generation(s) %s failed", what, [r.generation.id for r in requests])
        for request in requests:
            self._finish(request, _Finished("error", _failure(exc)))

    def _advance(self, request: _Request, logits: torch.Tensor) -> bool:
        """Sample and stream the request's next token. Returns whether it goes on decoding."""
        generation = request.generation
        if generation.cancelled:
            return self._finish(request, _Finished("cancelled"))
        if time.monotonic() > request.deadline:
            return self._finish(request, _Finished("length"))
        try:
            token_id = sample(logits, generation.sampling, request.rng, request.sampled)
        except Exception as exc:
            log.exception("Sampling for generation %d failed", generation.id)
            return self._finish(request, _Finished("error", _failure(exc)))
        if token_id in self.loaded.eos_token_ids:
            return self._finish(request, _Finished("stop"))
        generation.completion_tokens += 1
        request.sampled.append(token_id)
        if piece := request.detokenizer.push(token_id):
            request.hand_over((piece, generation.completion_tokens))
        if generation.completion_tokens >= request.budget:
            return self._finish(request, _Finished("length"))
        request.next_token = token_id
        return True

    def _finish(self, request: _Request, finished: _Finished) -> bool:
        request.outcome = finished.reason
        if finished.reason in ("stop", "length") and request.detokenizer and (tail := request.detokenizer.flush()):
            request.hand_over((tail, request.generation.completion_tokens))
        with self._lock:
            self._pending -= 1
            self._running -= request.running
        request.hand_over(finished)
        return False


def _failure(exc: Exception) -> GenerationError:
    return GenerationError(f"The model failed while generating ({type(exc).__name__}: {exc}).")
