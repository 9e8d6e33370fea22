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
from backend.engine.allocator import give_back_free_memory
from backend.engine.constraint import Constraint, Vocabulary
from backend.engine.detokenizer import IncrementalDetokenizer
from backend.engine.errors import EngineBusyError, GenerationError, InvalidSamplingError, PromptTooLongError
from backend.engine.generation import Deliver, Finished, Generation, to_event_loop
from backend.engine.kv_budget import KvBudget, reading_of, token_bytes
from backend.engine.loading import LoadedModel
from backend.engine.prefix_cache import PrefixCache
from backend.engine.prompt import Prompt, encode_prompt
from backend.engine.protocol import MAX_CHOICES, ChatMessage, ResolvedSampling, TokenLogprob, ToolSpec
from backend.engine.sampling import adjust, sample, token_logprobs
from backend.engine.settings import EngineSettings
from backend.engine.stops import StopStrings

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
    def end(self) -> int:
        """The most tokens it can hold in the KV cache: its prompt and its token limit (its KV budget reservation)."""
        return len(self.prompt_ids) + self.budget

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
        # One bound on all keys and values: the rows, and the prefix cache in what they leave
        # (kv_budget.py). Transformers' forward copies its whole cache each step (a concatenation):
        # its tokens count twice.
        dtype = slots.kv_dtype(loaded.model) if self.path is slots else loaded.model.dtype
        self.kv_budget = KvBudget(int(limits.kv_cache_mb * 2**20),
                                  token_bytes(loaded.model.config, dtype.itemsize) * (1 if self.path is slots else 2),
                                  limits.max_running, tensors=2 * loaded.model.config.num_hidden_layers)
        # Keys and values of finished requests, for the next turn of their conversation.
        self.prefix_cache = (PrefixCache(self.kv_budget.limit)
                             if self.path is slots and limits.prefix_cache else None)
        self.kv_usage = KvUsage(budget=self.kv_budget.limit)
        self._context_length = min(loaded.context_length, self.kv_budget.context_tokens())
        self.vocabulary = Vocabulary(loaded.tokenizer, self.vocab_size, list(loaded.eos_token_ids))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # signalled on submit and shutdown
        self._waiting: collections.deque[_Request] = collections.deque()  # submitted, for the loop to take
        self._queue: collections.deque[_Request] = collections.deque()  # the loop's: taken, not yet admitted
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
        """The longest conversation (prompt and reply) a request may have: the model's context,
        or less if the KV budget cannot hold that much for one request."""
        return self._context_length

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

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; everything in flight ends as cancelled. Waits for the loop's thread
        (it stops at its next step) and the vocabulary's build: a thread still inside torch or
        the tokenizer when the interpreter exits can abort it ("terminate called without an
        active exception")."""
        with self._work:
            self._stopped = True
            self._work.notify()
        if threading.current_thread() is not self._loop:
            self._loop.join(timeout_s)
        self.vocabulary.wait(timeout_s)

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
        longest = min(self.context_length, self.kv_budget.longest_alone(len(prompt_ids), n))
        room = longest - len(prompt_ids)
        if room < 1 or (not shorten and sampling.max_new_tokens > room):
            held = (f"the model's context holds {self.context_length}" if n == 1 else
                    f"the KV budget (engine.kv_cache_mb) holds {n} replies to it of up to {max(longest, 0)} "
                    "tokens each, the prompt included")
            raise PromptTooLongError(
                f"The prompt is {len(prompt_ids)} tokens and the reply may take up to "
                f"{sampling.max_new_tokens}; {held}. Shorten the conversation or ask for fewer tokens"
                f"{'' if n == 1 else ' or replies'}."
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
                while not (self._waiting or self._queue or reading or batch.requests or self._stopped):
                    # Idle a moment: time to build the grammar's vocabulary, which holds the GIL
                    # for 0.35-1.5 s. Built at start, it slowed the first reply after a restart
                    # by 0.37 s (485 against 115 ms to its first token).
                    if not self._work.wait(None if self.vocabulary.started else _IDLE_BEFORE_VOCABULARY_S):
                        self.vocabulary.build_soon()
                    self._last_step = time.monotonic()
                if self._stopped:
                    break
                self._queue.extend(self._waiting)
                self._waiting.clear()
            admitted = self._choose(batch, reading)
            with self._lock:
                for request in (choice for leader in admitted for choice in leader.choices):
                    request.running = True
                    self._running += 1
            planned = self._plan(batch, [p.request for p in reading] + admitted)
            reading.extend(filter(None, (self._admit(request, planned) for request in admitted)))
            self._reserve(batch, reading)
            try:
                self._read_prompts(reading, batch)
                if batch.requests:
                    logits = batch.step()
                    self._measure(batch, reading)
                    going_on = [self._advance(r, row) for r, row in zip(batch.requests, logits)]
                    self._remember(batch, [r for r, going in zip(batch.requests, going_on) if not going])
                    batch.keep([r for r, going in zip(batch.requests, going_on) if going])
            except Exception as exc:  # a failed forward pass fails the whole batch, not the loop
                self._fail(batch.requests, exc, "Decode step")
                batch = self._new_batch()
            self._reserve(batch, reading)
            self._measure(batch, reading)
            with self._lock:
                self._last_step = time.monotonic()
        for request in [*batch.requests, *(c for p in reading for c in p.request.choices),
                        *(c for leader in [*self._queue, *self._waiting] for c in leader.choices)]:
            self._finish(request, Finished("cancelled"))

    def _new_batch(self):
        return self.path.Batch(self.loaded.model, self.limits.max_running)

    # ---- Scheduling within the KV budget (kv_budget.py) -------------------------

    def _choose(self, batch, reading: collections.deque) -> list[_Request]:
        """The queued requests to admit now, oldest first: while the batch has places for all their
        replies, and their reservations fit in the KV budget beside those admitted before (and the
        prefix cache's pinned entries, which cannot be evicted). The first that does not fit waits,
        and those behind it with it. Requests whose clients left while they waited end here."""
        leaders = [p.request for p in reading]
        places = self.limits.max_running - len(batch.requests) - sum(len(leader.choices) for leader in leaders)
        pinned = self.prefix_cache.pinned_bytes if self.prefix_cache else 0
        for left in [leader for leader in self._queue if all(c.generation.cancelled for c in leader.choices)]:
            self._queue.remove(left)
            for choice in left.choices:
                self._finish(choice, Finished("cancelled"))
        admitted: list[_Request] = []
        while self._queue:
            head = self._queue[0]
            if len(head.choices) > places:
                break
            # Alone it always fits (submit checks `longest_alone`); admitted then, whatever the sums say.
            alone = not (batch.requests or leaders or admitted)
            if not alone and self._plan(batch, leaders + admitted + [head]) + pinned > self.kv_budget.limit:
                break
            admitted.append(self._queue.popleft())
            places -= len(head.choices)
        return admitted

    def _plan(self, batch, leaders: list[_Request]) -> int:
        """The bytes the rows may reach with the batch's requests and `leaders` (admitted, their
        prompts being read, and their replies then in the batch)."""
        ends = [r.end for r in batch.requests] + [choice.end for leader in leaders for choice in leader.choices]
        reading = [reading_of(len(leader.prompt_ids), len(leader.choices)) for leader in leaders]
        return self.kv_budget.plan(ends, reading, batch.allocated)

    def _reserve(self, batch, reading: collections.deque) -> None:
        """Cap the batch's growth at what its requests and the prompts being read reserve, and
        give the prefix cache what that leaves (it evicts down to it). Going idle, the memory
        the replies' keys and values and activations took goes back to the system."""
        ends = [r.end for r in batch.requests] + [c.end for p in reading for c in p.request.choices]
        going_idle = not ends and batch.allocated[0]
        batch.reserve(self.kv_budget.batch_rows(len(ends)), max(ends, default=0))
        if going_idle:  # the batch has just let its keys and values go
            give_back_free_memory()
        if self.prefix_cache is not None:
            self.prefix_cache.fit(self.kv_budget.limit - self._plan(batch, [p.request for p in reading]))

    def _measure(self, batch, reading: collections.deque, joining=None) -> None:
        """What the keys and values take now, for the metrics, and its peak (the tests hold it to the budget)."""
        rows = batch.nbytes + sum(p.nbytes for p in reading) + (joining.nbytes if joining is not None else 0)
        cached = self.prefix_cache.stats.bytes if self.prefix_cache else 0
        self.kv_usage = KvUsage(self.kv_budget.limit, rows, cached, max(self.kv_usage.peak, rows + cached))

    def _admit(self, request: _Request, planned: int):
        """Ready an admitted prompt's replies and start reading it from its longest cached prefix
        (one whose entry fits beside the `planned` bytes of the rows: it cannot be evicted until read)."""
        prefix = (self.prefix_cache.lookup(request.prompt_ids, pin_room=self.kv_budget.limit - planned)
                  if self.prefix_cache else None)
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
        while reading and not reading[0].started and reading[0].remaining <= budget and _fits_beside(whole, reading[0]):
            budget -= reading[0].remaining
            whole.append(reading.popleft())
        if whole:
            try:
                self._join(batch, self.path.read_whole(self.loaded.model, whole), reading)
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
                self._join(batch, prompt.rows(), reading)

    def _join(self, batch, rows, reading: collections.deque) -> None:
        """Sample each read prompt's first token; those that go on decoding join the batch.
        A prompt with several replies gives each its own copy of the row it was read into."""
        if any(request.siblings for request in rows.requests):
            rows = rows.take([i for i, request in enumerate(rows.requests) for _ in request.choices],
                             [choice for request in rows.requests for choice in request.choices])
        going_on = [self._advance(request, logits) for request, logits in zip(rows.requests, rows.logits)]
        self._remember(rows, [r for r, going in zip(rows.requests, going_on) if not going])
        if any(going_on):
            rows = rows.select(going_on)
            batch.add(rows)
            self._measure(batch, reading, joining=rows)

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
        if finished.reason == "stop" and request.stops.matched:
            finished = Finished(finished.reason, stop_sequence=request.stops.matched)
        # What the stream interval held goes out before the end (an error's too).
        if request.unsent_text or (request.unsent_logprobs and finished.reason in ("stop", "length")):
            self._send(request, "", now=True)
        with self._lock:
            self._pending -= 1
            self._running -= request.running
        request.hand_over(finished)
        return False


def _fits_beside(group: list, prompt) -> bool:
    """Whether `prompt` may be read in one forward pass with `group` in a KV as wide as their longest
    prompt (what the KV budget counts for them). Each row is padded to the longest unread part, so a
    prompt with a long cached prefix beside one with a long unread part would need a wider one: it
    waits for the next step."""
    prompts = [*group, prompt]
    width = max(p.remaining for p in prompts)
    return max(p.tokens_read for p in prompts) + width <= max(len(p.request.prompt_ids) for p in prompts)


@dataclass(frozen=True)
class KvUsage:
    """Bytes of keys and values the engine holds (its decode loop's last measure) and their peak."""

    budget: int
    rows: int = 0  # the running replies' and the prompts being read
    prefix_cache: int = 0
    peak: int = 0  # the most rows and prefix cache held together at one measure


def _failure(exc: Exception) -> GenerationError:
    return GenerationError(f"The model failed while generating ({type(exc).__name__}: {exc}).")
