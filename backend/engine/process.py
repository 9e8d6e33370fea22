"""The engine in a process of its own, beside the Serve replica that streams its replies.

Why: the decode loop gives up Python's GIL around every torch op (hundreds a step) and
must win it back after each. In a model replica the event loop streams every token
through Ray, Python work that holds the GIL a share of the time, so a step waits on it
again and again. Measured (`python -m bench.step`): another thread running Python 20 % of
the time made an 8-row step 1.29x slower; in a served replica, 8-row steps took 1.33x
their in-process time (docs/BENCHMARKS.md). vLLM keeps its engine core out of its API
server's process for the same reason.

So the replica starts `python -m backend.engine.process` and keeps only torch-free work:
requests in, pieces out, over a socket pair (multiprocessing's Connection: pickled
messages). The child has its own interpreter and GIL; its decode loop sends each piece
itself, one small message.

    replica (EngineProcess)              engine process (serve)
    submit_choices / fit / stats  --ask-->    Engine
                                  <--answer--
    Generation.cancel             --cancel-->
                                  <--item--   each piece and end, from the decode loop
                                  <--status-- load and health, twice a second

The child exits when the replica goes (its socket closes), however the replica ends.

A warm engine: `make run` (backend/launch.py) starts an engine process for the model in
deploy.yaml once Ray's node answers, so that torch's import and the weights' load (seconds
on two cores) happen while Serve starts and builds the application, not after. It waits on
a Unix socket named in TEXTBOT_WARM_ENGINE; the first replica of this node to connect adopts
it, and the socket goes.
Any other replica, or one asking for another model, gets an engine process of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace

from backend.engine import cpus, errors
from backend.engine.errors import GenerationError
from backend.engine.generation import Finished, Generation
from backend.engine.location import ModelLoadError
from backend.engine.protocol import ChatMessage, ResolvedSampling, ToolSpec
from backend.engine.settings import EngineSettings, ModelSettings

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.5
WARM_ENGINE_ENV = "TEXTBOT_WARM_ENGINE"
# A warm engine answers its connection at once (it loads on another thread): longer means it is stuck.
ADOPT_TIMEOUT_S = 10
# Refusals the engine raises at submit, rebuilt on the replica's side by name.
_REFUSALS = {cls.__name__: cls for cls in (errors.PromptTooLongError, errors.InvalidSamplingError,
                                           errors.EngineBusyError, ModelLoadError, ValueError)}


class EngineProcess:
    """The replica's side: what Textbot needs of an engine, answered by the engine process."""

    def __init__(self, model: ModelSettings, limits: EngineSettings, torch_threads: int | None = None):
        self._conn, self._process = adopt_warm_engine() or start_engine_process()
        # Ray sets OMP_NUM_THREADS to the replica's CPUs: resolved here, in the replica's environment,
        # which a warm engine process was not started in.
        self._conn.send((model, limits, torch_threads or int(os.environ.get("OMP_NUM_THREADS") or 1)))
        try:
            hello = self._conn.recv()  # the model loaded, or why not
        except EOFError:
            raise ModelLoadError(f"The engine process exited while loading the model "
                                 f"({_exit_code(self._process.wait())}); its log says why.") from None
        if hello[0] == "failed":
            self.shutdown()
            raise _REFUSALS.get(hello[1], RuntimeError)(hello[2])
        _, info = hello
        self.name, self.context_length, self.fallback = info["name"], info["context_length"], info["fallback"]
        self.pid = self._process.pid
        self._silence_limit_s = limits.max_stall_seconds
        self._send_lock = threading.Lock()
        self._asks: dict[int, tuple] = {}
        self._ask_ids = itertools.count()
        self._generations: dict[int, tuple[Generation, asyncio.AbstractEventLoop]] = {}
        self._status = {"running": 0, "in_flight": 0, "problem": None, "prefix_cache": None, "kv": None, "rss": 0}
        self._status_at = time.monotonic()
        self._gone: str | None = None
        self._stopping = False
        threading.Thread(target=self._read, name="engine-process-reader", daemon=True).start()

    # ---- What Textbot calls -------------------------------------------------

    async def submit_choices(self, prompt: list[ChatMessage] | str | list[int], sampling: ResolvedSampling,
                             n: int, shorten: bool = True, tools: list[ToolSpec] | None = None) -> list[Generation]:
        """As Engine.submit_choices; raises its refusals (too long, busy, invalid) the same way."""
        loop = asyncio.get_running_loop()

        def generations(started: list[tuple[int, int, int, int | None]]) -> list[Generation]:
            # Registered here, on the reader thread, before it reads their first piece.
            made = []
            for generation_id, prompt_tokens, index, seed in started:
                generation = Generation(generation_id, prompt_tokens, sampling.model_copy(update={"seed": seed}),
                                        index, on_cancel=lambda i=generation_id: self._send(("cancel", i)))
                self._generations[generation_id] = (generation, loop)
                made.append(generation)
            return made

        return await self._ask(generations, "submit", prompt, sampling, n, shorten, tools)

    async def fit(self, conversation: list[ChatMessage], budget: int) -> tuple[list[ChatMessage], int]:
        """The conversation without its oldest turns until its prompt fits `budget` tokens."""
        return await self._ask(None, "fit", conversation, budget)

    async def stats(self) -> dict:
        """Now, not as last reported: {"running", "in_flight", "prefix_cache", "kv", "rss", "allocator"}:
        PrefixCacheStats as a dict (None without a prefix cache), the engine's KvUsage as a dict, the
        engine process's RSS, and the glibc malloc settings it runs with."""
        return await self._ask(None, "stats")

    @property
    def memory(self) -> tuple[int, dict | None]:
        """As last reported: the engine process's resident bytes, and its KvUsage as a dict (None before the first report)."""
        return self._status["rss"], self._status["kv"]

    @property
    def running(self) -> int:
        return self._status["running"]

    @property
    def in_flight(self) -> int:
        return self._status["in_flight"]

    @property
    def prefix_cache_stats(self):
        """The last reported totals, with attributes as PrefixCacheStats has them, or None."""
        stats = self._status["prefix_cache"]
        return SimpleNamespace(**stats) if stats else None

    def problem(self) -> str | None:
        """Why the engine cannot serve, or None (for Serve's health check)."""
        if self._gone:
            return self._gone
        silent = time.monotonic() - self._status_at
        if silent > self._silence_limit_s:
            return f"The engine process has sent no status for {silent:.0f} s."
        return self._status["problem"]

    def shutdown(self) -> None:
        """Stop the engine process; everything in flight ends as cancelled."""
        self._stopping = True
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()

    # ---- The socket ---------------------------------------------------------

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except OSError:
                pass  # the engine process is gone; the reader fails what was in flight

    async def _ask(self, build, *request):
        if self._gone:
            raise GenerationError(self._gone)
        ask_id = next(self._ask_ids)
        future = asyncio.get_running_loop().create_future()
        self._asks[ask_id] = (future, asyncio.get_running_loop(), build)
        self._send(("ask", ask_id, *request))
        return await future

    def _read(self) -> None:
        """The engine's messages, handed to the event loops waiting for them."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "item":
                    _, generation_id, item, completion_tokens, cached_tokens = message
                    if isinstance(item, Finished):
                        entry = self._generations.pop(generation_id, None)
                    else:
                        entry = self._generations.get(generation_id)
                    if entry:
                        generation, loop = entry
                        _call_soon(loop, _deliver, generation, item, completion_tokens, cached_tokens)
                elif message[0] == "status":
                    self._status, self._status_at = message[1], time.monotonic()
                elif message[0] == "answer":
                    _, ask_id, ok, value = message
                    future, loop, build = self._asks.pop(ask_id)
                    if ok and build:
                        value = build(value)
                    elif not ok:
                        value = _REFUSALS.get(value[0], GenerationError)(*value[1:])
                    _call_soon(loop, _settle, future, ok, value)
        except (EOFError, OSError):
            pass
        self._gone = f"The engine process exited ({_exit_code(self._process.wait())})."
        if not self._stopping:
            log.error(self._gone)
        for generation, loop in list(self._generations.values()):
            _call_soon(loop, generation.put, Finished("error", GenerationError(
                f"The model failed while generating ({self._gone})")))
        self._generations.clear()
        for future, loop, _ in list(self._asks.values()):
            _call_soon(loop, _settle, future, False, GenerationError(self._gone))


# glibc's malloc in the engine process (a setting already in the environment wins). Its dynamic mmap
# threshold rises to the size of each large block freed, up to 32 MB, so freed tensors of up to
# 32 MB (a prompt's activations, KV rows moved, the load's temporaries) stay in its heaps instead of
# going back to the system. Measured 2026-12-06, the default model in an engine process (eager,
# prefix cache off), 32 requests of 5-400 words and 16-256 new tokens, 8 at a time, one run each on
# a quiet machine: RSS after start / after a first reply / idle after the load,
#   glibc as it comes             540 / 641 / 1072 MB
#   fixed 4 MiB thresholds        464 / 564 / 1094
#   fixed 1 MiB thresholds        515 / 616 /  950
#   fixed 128 KiB thresholds      455 / 551 /  877   (this; the same with MALLOC_ARENA_MAX=2 too)
# Decode steps (compiled, 1 and 8 rows, one thread) took the same time with it (ratios 0.96-1.04,
# two processes side by side); reading a 128-token prompt took 1.2-1.4x as long (every activation
# over 128 KiB is mapped and unmapped), 1.04-1.07x with 1 MiB. So 1 MiB, and what the heaps still
# keep free is given back with malloc_trim once loaded and whenever the engine goes idle
# (allocator.py): one trim after the load alone took glibc as it comes from 547 to
# 445 MB, at no cost to speed. (Most of the growth under load is the KV cache's rows, which the
# engine's KV budget bounds, not the allocator.)
ENGINE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def _engine_process(*args: str, **popen) -> subprocess.Popen:
    """`python -m backend.engine.process ARGS` (see main), importing what this process imports,
    with the allocator settings above."""
    env = {**ENGINE_ALLOCATOR_ENV, **os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", "backend.engine.process", *args], env=env, **popen)


def start_engine_process() -> tuple[Connection, subprocess.Popen]:
    """An engine process of this replica's own, and the socket to it."""
    mine, theirs = socket.socketpair()
    process = _engine_process(str(theirs.fileno()), pass_fds=[theirs.fileno()])
    theirs.close()
    return Connection(mine.detach()), process


def start_warm_engine(socket_path: Path, model: ModelSettings, **popen) -> subprocess.Popen:
    """A warm engine loading `model`, for a replica to adopt at `socket_path`; it exits if this
    process (its launcher) goes before one does."""
    return _engine_process("--warm", str(socket_path), str(os.getpid()), model.model_dump_json(), **popen)


def adopt_warm_engine() -> tuple[Connection, "_Adopted"] | None:
    """The warm engine process waiting at TEXTBOT_WARM_ENGINE, now this replica's; None when
    there is none, or another replica took it first."""
    if not (path := os.environ.get(WARM_ENGINE_ENV)):
        return None
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
    except OSError:  # gone: adopted already, or never started
        sock.close()
        return None
    conn = Connection(sock.detach())
    try:
        if conn.poll(ADOPT_TIMEOUT_S):
            _, pid = conn.recv()  # ("adopted", pid); the end of the file if another replica was first
            return conn, _Adopted(pid)
    except (EOFError, OSError):
        pass
    conn.close()
    return None


class _Adopted:
    """What EngineProcess needs of a Popen, for an engine process the launcher started (and
    reaps when it exits: then its pid is gone here)."""

    def __init__(self, pid: int):
        self.pid = pid

    def wait(self, timeout: float | None = None) -> None:
        """Until the process has exited; its exit code is the launcher's to know."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while alive(self.pid):
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"engine process {self.pid}", timeout)
            time.sleep(0.05)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    """Whether `pid` runs: neither gone nor exited and waiting for its parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # exited but not yet reaped by its parent
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _exit_code(code: int | None) -> str:
    return "exit code unknown" if code is None else f"exit code {code}"


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback` on `loop`, from the reader thread; nothing if the loop has closed
    (the replica is shutting down): the reader must go on reading until the socket ends."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _deliver(generation: Generation, item, completion_tokens: int, cached_tokens: int) -> None:
    generation.completion_tokens, generation.cached_tokens = completion_tokens, cached_tokens
    generation.put(item)


def _settle(future: asyncio.Future, ok: bool, value) -> None:
    if not future.done():
        future.set_result(value) if ok else future.set_exception(value)


# ---- The engine process ---------------------------------------------------------


def serve(conn: Connection, warm: tuple[ModelSettings, Future] | None = None) -> None:
    """Load the model (or take it from `warm`, the model loaded ahead, if it is the one asked
    for), then answer the replica until it goes."""
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    model, limits, torch_threads = conn.recv()
    # Before the decode loop's threads start, so they inherit it (threads that loading
    # started are moved too).
    if pinned := cpus.pin_engine(torch_threads):
        log.info("The engine runs on CPU %s, set aside for it (%s)", ",".join(map(str, pinned)), cpus.ENV)
    try:
        loaded = _loaded_ahead(warm, model) or _load(model)
    except Exception as exc:  # noqa: BLE001 - the replica raises it with its message
        send(("failed", type(exc).__name__, str(exc)))
        return
    # Imported here, not before: a warm engine's loading thread imports them too, and
    # transformers' lazy modules do not take two threads importing at once.
    from backend.engine.allocator import give_back_free_memory
    from backend.engine.engine import Engine
    from backend.engine.prompt import fit_to_context

    generations: dict[int, Generation] = {}

    def deliver(generation: Generation, item) -> None:
        if isinstance(item, Finished):
            generations.pop(generation.id, None)
        try:
            send(("item", generation.id, item, generation.completion_tokens, generation.cached_tokens))
        except OSError:
            os._exit(0)  # the replica is gone: nobody is listening

    engine = Engine(loaded, limits, torch_threads, deliver=deliver)
    give_back_free_memory()  # the load's temporaries

    def submit(prompt, sampling, n, shorten, tools):
        started = engine.submit_choices(prompt, sampling, n, shorten, tools)
        generations.update((g.id, g) for g in started)
        return [(g.id, g.prompt_tokens, g.index, g.sampling.seed) for g in started]

    def stats():
        cache = engine.prefix_cache
        return {"running": engine.running, "in_flight": engine.in_flight,
                "prefix_cache": vars(cache.stats).copy() if cache else None,
                "kv": dataclasses.asdict(engine.kv_usage), "rss": resident_bytes(),
                # As this process got them: the environment may set its own (it wins).
                "allocator": {name: os.environ.get(name) for name in ENGINE_ALLOCATOR_ENV}}

    answers = {"submit": submit, "stats": stats,
               "fit": lambda conversation, budget: fit_to_context(conversation, engine.count_prompt_tokens, budget)}

    def report() -> None:
        while True:
            send(("status", stats() | {"problem": engine.problem()}))
            time.sleep(STATUS_INTERVAL_S)

    send(("ready", {"name": loaded.name, "context_length": engine.context_length, "fallback": engine.fallback}))
    threading.Thread(target=report, name="status", daemon=True).start()
    while True:
        message = conn.recv()
        if message[0] == "cancel":
            if generation := generations.get(message[1]):
                generation.cancel()
        elif message[0] == "ask":
            _, ask_id, what, *args = message
            try:
                # Under the send lock: the answer to a submit goes out before any of its pieces.
                with send_lock:
                    conn.send(("answer", ask_id, True, answers[what](*args)))
            except Exception as exc:  # noqa: BLE001 - a refusal, raised again in the replica
                send(("answer", ask_id, False, (type(exc).__name__, str(exc), *_param(exc))))
        elif message[0] == "stop":
            break
    engine.shutdown()


def resident_bytes(pid: int | str = "self") -> int:
    """A process's resident memory (RSS), from /proc."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _loaded_ahead(warm: tuple[ModelSettings, Future] | None, model: ModelSettings):
    """The warm engine's model, if it is `model` and loaded; else None (then it is loaded
    again, and a failure is reported as the replica's own load would be)."""
    if warm is None:
        return None
    wanted, loading = warm
    try:
        loaded = loading.result()  # also when unwanted: one thread imports and loads at a time
    except Exception:  # noqa: BLE001 - loaded again, to fail with its message
        return None
    if wanted != model:
        log.info("The replica asked for another model than the one loaded ahead: loading %s", model.source)
        return None
    return loaded


def _load(model: ModelSettings):
    """The model, with what the engine runs it with imported and its weights laid out as
    the Engine would lay them out (seconds of a start: a warm engine does it before its
    replica asks)."""
    import backend.engine.engine  # noqa: F401
    from backend.engine import slots
    from backend.engine.loading import load

    loaded = load(model)
    if not loaded.fallback:
        slots.prepare(loaded.model)
    return loaded


def wait_to_be_adopted(path: str, launcher: int, model: ModelSettings) -> tuple[Connection, tuple[ModelSettings, Future]]:
    """The warm engine: load `model` while listening at `path` for the first replica, then
    stop listening. Exits if its launcher (the parent, pid `launcher`) goes first: nobody else
    would adopt it. The pid is given, not read here: the launcher may be gone already."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    listener.settimeout(1.0)
    loading = ThreadPoolExecutor(1, thread_name_prefix="load-ahead").submit(_load, model)
    log.info("A warm engine: loading %s ahead, for the first model replica to adopt", model.source)
    while True:
        try:
            sock, _ = listener.accept()
            break
        except TimeoutError:
            if os.getppid() != launcher:
                os._exit(0)
    listener.close()
    Path(path).unlink(missing_ok=True)
    sock.setblocking(True)
    conn = Connection(sock.detach())
    conn.send(("adopted", os.getpid()))
    log.info("A model replica adopted this warm engine")
    return conn, (model, loading)


def _param(exc: Exception) -> tuple:
    return (exc.param,) if isinstance(exc, errors.InvalidSamplingError) else ()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine %(name)s -- %(message)s")
    try:
        if sys.argv[1] == "--warm":  # python -m backend.engine.process --warm SOCKET LAUNCHER_PID MODEL_SETTINGS_JSON
            conn, warm = wait_to_be_adopted(sys.argv[2], int(sys.argv[3]), ModelSettings.model_validate_json(sys.argv[4]))
        else:  # python -m backend.engine.process FD, started by its replica
            conn, warm = Connection(int(sys.argv[1])), None
        serve(conn, warm)
    except (EOFError, OSError):
        pass  # the replica went away
    # Not a normal exit: it would wait for the decode loop's thread mid-step.
    os._exit(0)


if __name__ == "__main__":
    main()
