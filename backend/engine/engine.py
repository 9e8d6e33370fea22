"""The generation engine: a request in, an async stream of text pieces out, cancellable.

Its whole interface is `Engine.submit(prompt, sampling) -> Generation`, then
`async for piece in generation` and `generation.cancel()`; `submit_choices` starts
several replies to one prompt, which is read once.

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
(the engine's own transformer, for the families in `families/`) or `batch.py` (any other, through
Hugging Face's forward).

Each request samples on its own (`_advance`): logit bias and penalties, the output
schema's grammar (`constraint.py`), its seed; its stop strings end it. Several replies
to one prompt (`submit_choices`) are admitted together, read as one, and each gets a
copy of the prompt's row when it joins the batch.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from backend.engine import batch as generic_path, slots
from backend.engine.constraint import Constraint, Vocabulary
from backend.engine.detokenizer import IncrementalDetokenizer
from backend.engine.generation import Deliver, Finished, Generation, to_event_loop
from backend.engine.loading import LoadedModel
from backend.engine.prefix_cache import PrefixCache
from backend.engine.prompt import Prompt, encode_prompt
from backend.engine.sampling import adjust, sample, token_logprobs
from backend.engine.stops import StopStrings
from backend.errors import EngineBusyError, GenerationError, InvalidSamplingError, PromptTooLongError
from backend.protocol import MAX_CHOICES, ChatMessage, ResolvedSampling, TokenLogprob, ToolSpec
from backend.settings import EngineSettings

log = logging.getLogger(__name__)


@dataclass
class _Request:
    """A submitted generation and what the loop needs to run it."""

    generation: Generation
    prompt_ids: list[int]
    budget: int  # new tokens allowed: the request's limit, cut to the room left in the context
    deliver: Deliver  # hands the consumer a piece or the end
    grammar: str | None = None  # the output schema's, compiled at submit
    siblings: list[_Request] = field(default_factory=list)  # the prompt's other replies, read with this one
    rng: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    constraint: Constraint | None = None
    stops: StopStrings | None = None
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens whose text is held back
    unsent_text: str = ""  # decoded, waiting for the stream interval to pass
    last_sent: float = 0.0  # when the last piece went out (monotonic)
    deadline: float = float("inf")
    running: bool = False  # admitted to the batch
    length: int = 0  # tokens of this request in the KV cache (its prompt's, once read)
    next_token: int = 0  # sampled and streamed, fed to the model at the next step
    sampled: list[int] = field(default_factory=list)  # the reply's token ids so far
    outcome: str | None = None  # the finish reason, once finished

    @property
    def choices(self) -> list[_Request]:
        """This request and the replies that share its prompt."""
        return [self, *self.siblings]

    @property
    def cached_ids(self) -> list[int]:
        """The token ids whose keys and values the KV cache holds for this request."""
        return (self.prompt_ids + self.sampled)[:self.length]

    def hand_over(self, item) -> None:
        self.deliver(self.generation, item)


# How long the engine waits idle before building the grammar's vocabulary.
_IDLE_BEFORE_VOCABULARY_S = 1.0


class Engine:
    def __init__(self, loaded: LoadedModel, limits: EngineSettings = EngineSettings(), torch_threads: int | None = None,
                 deliver: Deliver | None = None):
        """`deliver(generation, item)` hands each piece and end to its consumer, from the decode
        loop's thread; by default into the generation itself, on the event loop that submitted it."""
        self.loaded = loaded
        self._deliver = deliver
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.limits = limits
        # The tensors of batching: the lean slot path for the architectures it knows, else
        # Hugging Face's forward. Both have read_whole, PromptReader, Batch and Rows.
        self.path = generic_path if loaded.fallback else slots
        if self.path is slots:
            slots.prepare(loaded.model)
        else:
            log.warning("%s runs through transformers' forward, without the slot cache, the prefix cache and the "
                        "compiled step, because %s", loaded.name, loaded.fallback)
        # Keys and values of finished requests, for the next turn of their conversation.
        self.prefix_cache = (PrefixCache(int(limits.prefix_cache_mb * 2**20))
                             if self.path is slots and limits.prefix_cache_mb else None)
        self.vocabulary = Vocabulary(loaded.tokenizer, self.vocab_size, list(loaded.eos_token_ids))
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

    @property
    def fallback(self) -> str | None:
        """Why transformers' forward runs the model rather than the engine's own transformer; None if it does not."""
        return self.loaded.fallback

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.config.vocab_size

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
        return len(encode_prompt(self.loaded.tokenizer, messages))

    def submit(self, prompt: Prompt, sampling: ResolvedSampling, shorten: bool = True,
               tools: list[ToolSpec] | None = None) -> Generation:
        """Start generating a reply to `prompt` (a conversation, a text or token ids; `tools`
        the conversation may call). Call from the event loop.

        A reply that would overflow the context is cut at its end when `shorten`,
        refused otherwise; a prompt that fills the context is always refused.
        """
        return self.submit_choices(prompt, sampling, 1, shorten, tools)[0]

    def submit_choices(self, prompt: Prompt, sampling: ResolvedSampling, n: int, shorten: bool = True,
                       tools: list[ToolSpec] | None = None) -> list[Generation]:
        """`n` replies to one prompt, read once; reply i samples with seed `seed + i`."""
        self._check_sampling(sampling, n)
        prompt_ids = encode_prompt(self.loaded.tokenizer, prompt, tools)
        if outside := [i for i in prompt_ids if not 0 <= i < self.vocab_size]:
            raise InvalidSamplingError(f"The prompt holds token ids outside the vocabulary (0 to "
                                       f"{self.vocab_size - 1}): {outside[:5]}.", param="prompt")
        room = self.context_length - len(prompt_ids)
        if room < 1 or (not shorten and sampling.max_new_tokens > room):
            raise PromptTooLongError(
                f"The prompt is {len(prompt_ids)} tokens and the reply may take up to "
                f"{sampling.max_new_tokens}; the model's context holds {self.context_length}. "
                "Shorten the conversation or ask for fewer tokens."
            )
        grammar = self.vocabulary.grammar(sampling.output_schema) if sampling.output_schema else None
        deliver = self._deliver or to_event_loop(asyncio.get_running_loop())
        requests = []
        for index in range(n):
            seed = None if sampling.seed is None else (sampling.seed + index) % 2**63
            generation = Generation(id=next(self._ids), prompt_tokens=len(prompt_ids),
                                    sampling=sampling.model_copy(update={"seed": seed}), index=index)
            requests.append(_Request(generation, prompt_ids, min(sampling.max_new_tokens, room), deliver,
                                     grammar=grammar, length=len(prompt_ids)))
        leader = requests[0]
        leader.siblings = requests[1:]
        with self._work:
            if self._pending + n > self.limits.max_running + self.limits.max_waiting:
                raise EngineBusyError(
                    f"All {self.limits.max_running} generation slots and {self.limits.max_waiting} waiting places are "
                    "taken. Try again in a few seconds."
                )
            self._pending += n
            self._waiting.append(leader)
            self._work.notify()
        return [r.generation for r in requests]

    def _check_sampling(self, sampling: ResolvedSampling, n: int) -> None:
        if not 1 <= n <= min(MAX_CHOICES, self.limits.max_running):
            raise InvalidSamplingError(f"n must be between 1 and {min(MAX_CHOICES, self.limits.max_running)} "
                                       "(every reply takes a place in the batch).", param="n")
        if sampling.logit_bias and (outside := [i for i in sampling.logit_bias if not 0 <= i < self.vocab_size]):
            raise InvalidSamplingError(f"logit_bias names token ids outside the vocabulary (0 to "
                                       f"{self.vocab_size - 1}): {outside[:5]}.", param="logit_bias")

    # ---- The decode loop (its own thread) -------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        batch = self._new_batch()
        reading: collections.deque = collections.deque()  # admitted, prompt still being read
        while True:
            with self._work:
                while not (self._waiting or reading or batch.requests or self._stopped):
                    # Idle a moment: time to build the grammar's vocabulary, which holds the GIL
                    # for 0.35-1.5 s. Built at start, it slowed the first reply after a restart
                    # by 0.37 s (485 against 115 ms to its first token).
                    if not self._work.wait(None if self.vocabulary.started else _IDLE_BEFORE_VOCABULARY_S):
                        self.vocabulary.build_soon()
                    self._last_step = time.monotonic()
                if self._stopped:
                    break
                room = self.limits.max_running - len(batch.requests) - sum(len(p.request.choices) for p in reading)
                admitted = []
                while self._waiting and len(self._waiting[0].choices) <= room:
                    admitted.append(self._waiting.popleft())
                    room -= len(admitted[-1].choices)
                for request in (choice for leader in admitted for choice in leader.choices):
                    request.running = True
                    self._running += 1
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
        for request in [*batch.requests, *(c for p in reading for c in p.request.choices),
                        *(c for leader in self._waiting for c in leader.choices)]:
            self._finish(request, Finished("cancelled"))

    def _new_batch(self):
        return self.path.Batch(self.loaded.model, self.limits.max_running)

    def _admit(self, request: _Request):
        """Ready a waiting prompt's replies and start reading it from its longest cached prefix."""
        if all(choice.generation.cancelled for choice in request.choices):  # the client left while it waited
            for choice in request.choices:
                self._finish(choice, Finished("cancelled"))
            return None
        prefix = self.prefix_cache.lookup(request.prompt_ids) if self.prefix_cache else None
        deadline = time.monotonic() + self.limits.max_seconds if self.limits.max_seconds else float("inf")
        try:
            for choice in request.choices:
                sampling = choice.generation.sampling
                choice.rng = torch.Generator()
                choice.rng.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
                choice.detokenizer = IncrementalDetokenizer(self.loaded.tokenizer)
                choice.stops = StopStrings(sampling.stop)
                choice.constraint = Constraint(self.vocabulary, choice.grammar) if choice.grammar else None
                choice.deadline = deadline
                choice.generation.cached_tokens = prefix.length if prefix else 0
        except Exception as exc:
            if prefix:
                prefix.release()
            return self._fail(request.choices, exc, "Admission")
        return self.path.PromptReader(self.loaded.model, request, prefix)

    def _read_prompts(self, reading: collections.deque, batch) -> None:
        """Read at most `prefill_chunk` prompt tokens in this step, oldest prompt first: those
        not yet started that fit whole go together in one forward pass; what is left of the
        budget reads the next prompt a chunk further. Prompts read to their end join the batch."""
        for prompt in [p for p in reading if all(c.generation.cancelled for c in p.request.choices)]:
            reading.remove(prompt)
            prompt.finish()
            for choice in prompt.request.choices:
                self._finish(choice, Finished("cancelled"))
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
                self._fail([c for prompt in whole for c in prompt.request.choices], exc, "Prefill")
        if reading and budget > 0:
            prompt = reading[0]
            try:
                prompt.read(budget)
            except Exception as exc:
                reading.popleft()
                prompt.finish()
                return self._fail(prompt.request.choices, exc, "Prefill")
            if prompt.done:
                reading.popleft()
                self._join(batch, prompt.rows())

    def _join(self, batch, rows) -> None:
        """Sample each read prompt's first token; those that go on decoding join the batch.
        A prompt with several replies gives each its own copy of the row it was read into."""
        if any(request.siblings for request in rows.requests):
            rows = rows.take([i for i, request in enumerate(rows.requests) for _ in request.choices],
                             [choice for request in rows.requests for choice in request.choices])
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
            self._finish(request, Finished("error", _failure(exc)))

    def _advance(self, request: _Request, logits: torch.Tensor) -> bool:
        """Sample and stream the request's next token. Returns whether it goes on decoding."""
        generation = request.generation
        if generation.cancelled:
            return self._finish(request, Finished("cancelled"))
        if time.monotonic() > request.deadline:
            return self._finish(request, Finished("length"))
        sampling = generation.sampling
        try:
            logits = adjust(logits, sampling, request.sampled)
            if request.constraint:
                logits = request.constraint.mask(logits)
            token_id = sample(logits, sampling, request.rng)
            if token_id in self.loaded.eos_token_ids:
                return self._finish(request, Finished("stop"))
            if sampling.logprobs is not None:
                request.unsent_logprobs.append(token_logprobs(logits, token_id, sampling.logprobs,
                                                              self._token_text))
            if request.constraint:
                request.constraint.advance(token_id)
        except Exception as exc:
            log.exception("Sampling for generation %d failed", generation.id)
            return self._finish(request, Finished("error", _failure(exc)))
        generation.completion_tokens += 1
        request.sampled.append(token_id)
        text, stopped = request.stops.push(request.detokenizer.push(token_id))
        if text:
            self._send(request, text)
        if stopped:
            request.detokenizer = None  # what it still holds comes after the stop string
            return self._finish(request, Finished("stop"))
        if request.constraint and request.constraint.complete:
            return self._finish(request, Finished("stop"))
        if generation.completion_tokens >= request.budget:
            return self._finish(request, Finished("length"))
        request.next_token = token_id
        return True

    def _token_text(self, token_id: int) -> tuple[str, bytes]:
        raw = self.vocabulary.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw

    def _send(self, request: _Request, text: str, now: bool = False) -> None:
        """Stream `text`, joined with what waits, once `stream_interval_ms` has passed since the
        reply's last piece (or `now`). Every piece costs Serve's proxy and the ingress the same
        CPU whatever its length: at 8 streams on 2 cores, about 3.6 ms a piece in all."""
        request.unsent_text += text
        sent_at = time.monotonic()
        if now or (sent_at - request.last_sent) * 1000 >= self.limits.stream_interval_ms:
            request.hand_over((request.unsent_text, request.generation.completion_tokens, request.unsent_logprobs))
            request.unsent_text, request.unsent_logprobs, request.last_sent = "", [], sent_at

    def _finish(self, request: _Request, finished: Finished) -> bool:
        request.outcome = finished.reason
        if finished.reason in ("stop", "length") and request.detokenizer:
            # The text held back: by the detokenizer (half a character), by the stop strings (maybe one's start).
            tail, stopped = request.stops.push(request.detokenizer.flush())
            request.unsent_text += tail + ("" if stopped else request.stops.flush())
        # What the stream interval held goes out before the end (an error's too).
        if request.unsent_text or (request.unsent_logprobs and finished.reason in ("stop", "length")):
            self._send(request, "", now=True)
        with self._lock:
            self._pending -= 1
            self._running -= request.running
        request.hand_over(finished)
        return False


def _failure(exc: Exception) -> GenerationError:
    return GenerationError(f"The model failed while generating ({type(exc).__name__}: {exc}).")
