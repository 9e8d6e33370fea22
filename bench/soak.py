"""`python -m bench.soak`: mixed traffic for a while, as an operator's users would send it, with
the errors counted and every process's memory read as it goes (issue 29).

--clients clients, each a loop that picks its next action at random (seeded): an OpenAI chat
stream (16-256 tokens); a conversation of 3-10 turns under one x-session-id (16-128 tokens a
turn); a stream abandoned after a few pieces (the connection closed); a bad request, which must
be answered 4xx in OpenAI's error shape; a call of the Ray Serve tutorial's endpoint
(POST /api/?prompt=...). It stops starting requests after --duration seconds or
--max-requests requests, whichever comes first.

Counted apart from errors: a 503 with Retry-After (a refusal under overload, as designed), a bad
request answered 4xx, a stream closed by the client. Anything else is an unexpected error,
kept with its text: a 5xx, a 4xx to a good request, a bad request served, a stream cut short
or ending without `[DONE]` and a finish reason.

Memory: every --sample-every seconds, the RSS (and PSS) of each process of the stack, from
/proc; which processes, see bench/processes.py. The first reading follows a warm-up reply. At
the end, the stack's Prometheus metrics (ray_textbot_*) when its exporter answers, and the
check `engine RSS at the end <= (RSS at start + KV budget) x 1.10`.

The stack is the one answering at --url (API under --api-path), or, if none does, deploy.yaml
served as `make run` serves it, for the length of the soak (bench/stack.py). With --peer
llamacpp the same traffic but the tutorial's endpoint (which llama-server does not have) goes
to llama.cpp's `llama-server` on the same GGUF file, 8 slots, 16384 tokens of context.

Writes <out>.json (<out>-llamacpp.json for the peer) and <out>.md, with both runs when both
files are there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import shlex
import statistics
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench import processes, stack
from ui.sources import sse_lines

ROOT = Path(__file__).resolve().parent.parent
# How often each client picks each kind of action.
MIX = {"stream": 35, "conversation": 25, "abandoned": 15, "bad": 10, "tutorial": 15}
PEER_KINDS = ("stream", "conversation", "abandoned", "bad")  # llama-server has no tutorial endpoint
OPENAI_STREAMS = ("stream", "conversation", "abandoned")
EXAMPLES_KEPT = 10
SLACK = 1.10  # the memory check's 10 %
# A reply of 256 tokens takes well under this even with every slot busy; longer is a hang.
REQUEST_TIMEOUT_S = 180
SAMPLING = {"temperature": 0.7, "top_p": 0.95}  # deploy.yaml's generation defaults, sent to both

PROMPTS = [
    "Tell me about the solar system.", "Write a short poem about the sea.", "What is a good name for a cat?",
    "Explain what a prime number is.", "How do I boil an egg?", "Give me three tips for learning to cook.",
    "What is the capital of France, and why is it famous?", "Summarise the story of Cinderella.",
    "How does a bicycle stay upright?", "Write a haiku about autumn.", "What do bees do in winter?",
    "Describe a sunset to someone who has never seen one.", "Why is the sky blue?",
]
FOLLOW_UPS = ["Tell me more.", "Can you say that more simply?", "Why?", "Give me an example.",
              "And what else?", "Summarise what you said in one sentence.", "Is that always true?",
              "What would a child make of that?", "Thanks. Another question: what is your favourite colour?"]
HELLO = [{"role": "user", "content": "Hi"}]
# What a careless client sends; each must come back 4xx in OpenAI's error shape.
BAD_REQUESTS = {
    "temperature 5": {"messages": HELLO, "temperature": 5},
    "max_tokens as text": {"messages": HELLO, "max_tokens": "many"},
    "empty messages": {"messages": []},
    "max_tokens 10^6": {"messages": HELLO, "max_tokens": 1_000_000},
    "content a number": {"messages": [{"role": "user", "content": 42}]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the served stack (default %(default)s)")
    parser.add_argument("--api-path", default="/api", help="the Textbot application's route prefix (default %(default)s)")
    parser.add_argument("--page-path", default="/", help="the chat page's route prefix, to wait for when starting a stack")
    parser.add_argument("--app", default="textbot", help="the Serve application measured: its engine and metrics "
                                                         "(default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("TEXTBOT_API_KEY"),
                        help="sent as a Bearer token (default: $TEXTBOT_API_KEY, else none)")
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default %(default)s)")
    parser.add_argument("--clients", type=int, default=6, help="clients at once (default %(default)s)")
    parser.add_argument("--max-requests", type=int, default=5000, help="a bound on HTTP requests (default %(default)s)")
    parser.add_argument("--sample-every", type=float, default=30, help="seconds between memory readings (default %(default)s)")
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--pid", type=int, help="measure this process's tree as the stack (default: found from "
                                                "the port's listener, or the stack this tool started)")
    parser.add_argument("--metrics-url", help="the stack's Prometheus exporter (default: the stack this tool started, "
                                              "else http://127.0.0.1:8080/metrics, `make run`'s)")
    parser.add_argument("--kv-budget-mb", type=float, help="the KV budget of one engine for the memory check "
                                                           "(default: ray_textbot_kv_budget_bytes when exported)")
    parser.add_argument("--no-start", action="store_true", help="never start a stack: fail if none answers")
    parser.add_argument("--peer", choices=["llamacpp"], help="soak llama.cpp's llama-server instead (same GGUF file)")
    parser.add_argument("--llamacpp-threads", type=int, help="llama-server's -t and -tb (default: the Textbot "
                                                             "model replica's CPUs in deploy.yaml, like for like)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "soak",
                        help="where the results go, without suffix (default %(default)s)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.max_requests < 1 or args.sample_every <= 0:
        parser.error("--duration, --clients, --max-requests and --sample-every must be positive")
    return args


# What happened to each request. The first four are expected; "error" is not.
EXPECTED_OUTCOMES = ("ok", "abandoned", "refused", "overloaded", "accepted")


@dataclass
class Result:
    kind: str
    # ok; abandoned (closed by the client); refused (a bad request, 4xx as it should be);
    # overloaded (503 with Retry-After); accepted (the peer served a bad request: not validated
    # there, not counted as its error); error (unexpected).
    outcome: str
    started_s: float
    ttft_ms: float | None = None
    detail: str = ""


@dataclass
class Traffic:
    """What every client shares: where to send, the bounds, and the results so far."""

    client: httpx.AsyncClient
    api: str
    headers: dict
    peer: bool
    deadline: float
    max_requests: int
    started: float = field(default_factory=time.perf_counter)
    sent: int = 0
    results: list[Result] = field(default_factory=list)

    def claim(self) -> bool:
        """Whether one more request may start (the soak's time and request bounds)."""
        if time.perf_counter() >= self.deadline or self.sent >= self.max_requests:
            return False
        self.sent += 1
        return True

    def since_start(self) -> float:
        return time.perf_counter() - self.started

    def record(self, result: Result) -> Result:
        self.results.append(result)
        return result


async def refusal(response: httpx.Response, kind: str, started_s: float) -> Result:
    """A non-200 answer to a request that should have been served: an expected refusal under
    overload (503 with Retry-After), else an unexpected error with its text."""
    await response.aread()
    if response.status_code == 503 and "retry-after" in response.headers:
        return Result(kind, "overloaded", started_s)
    return Result(kind, "error", started_s, detail=f"{response.status_code}: {response.text[:300]}")


async def chat_stream(traffic: Traffic, kind: str, messages: list[dict], max_tokens: int,
                      session: str | None = None, abandon_after: int | None = None) -> tuple[Result, str]:
    """One OpenAI chat completion, streamed; closed after `abandon_after` pieces if given. The
    result, and the reply's text."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, **SAMPLING}
    headers = traffic.headers | ({"x-session-id": session} if session else {})
    started_s, clock = traffic.since_start(), time.perf_counter()
    first, pieces, text, finish, done = None, 0, "", None, False
    try:
        async with traffic.client.stream("POST", f"{traffic.api}/v1/chat/completions", json=body,
                                         headers=headers) as response:
            if response.status_code != 200:
                return await refusal(response, kind, started_s), ""
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(kind, "error", started_s, detail=f"error in the stream: {chunk['error']}"[:300]), text
                for choice in chunk.get("choices") or ():
                    if piece := (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        pieces, text = pieces + 1, text + piece
                    finish = choice.get("finish_reason") or finish
                if abandon_after and pieces >= abandon_after:
                    # Leaving the block closes the connection mid-stream, as a closed browser tab does.
                    return Result(kind, "abandoned", started_s, ttft_ms(clock, first)), text
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return Result(kind, "error", started_s, detail=f"broken stream after {pieces} pieces: "
                                                       f"{type(error).__name__}: {error}"[:300]), text
    if not (done and finish):
        return Result(kind, "error", started_s, detail=f"the stream ended without "
                                                       f"{'a finish reason' if done else '[DONE]'}"), text
    return Result(kind, "ok", started_s, ttft_ms(clock, first)), text


def ttft_ms(clock: float, first: float | None) -> float | None:
    return round((first - clock) * 1000, 1) if first else None


async def single_stream(traffic: Traffic, rng: random.Random, client_id: int) -> None:
    if traffic.claim():
        messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
        traffic.record((await chat_stream(traffic, "stream", messages, rng.randint(16, 256)))[0])


async def conversation(traffic: Traffic, rng: random.Random, client_id: int) -> None:
    """3-10 turns, each sending the whole history, under one session id (so Textbot's router
    sends every turn to the replica holding the conversation's prefix cache)."""
    session = f"soak-{client_id}-{rng.getrandbits(32):08x}"
    history = [{"role": "user", "content": rng.choice(PROMPTS)}]
    for _ in range(rng.randint(3, 10)):
        if not traffic.claim():
            return
        result, reply = await chat_stream(traffic, "conversation", history, rng.randint(16, 128), session)
        # A blank reply ends it: Textbot refuses a blank message, and a client sending one back
        # would be making a bad request, which this one is not meant to be.
        if traffic.record(result).outcome != "ok" or not reply.strip():
            return
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": rng.choice(FOLLOW_UPS)}]


async def abandoned_stream(traffic: Traffic, rng: random.Random, client_id: int) -> None:
    """A long reply, closed after a few pieces: the server must stop generating it."""
    if traffic.claim():
        messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
        result, _ = await chat_stream(traffic, "abandoned", messages, rng.randint(128, 256),
                                      abandon_after=rng.randint(2, 6))
        traffic.record(result)


async def bad_request(traffic: Traffic, rng: random.Random, client_id: int) -> None:
    """A request the API must refuse with a 4xx in OpenAI's error shape. Sent as a stream, so
    that a peer serving it anyway is cut off at once rather than generating for minutes."""
    if not traffic.claim():
        return
    what = rng.choice(list(BAD_REQUESTS))
    started_s = traffic.since_start()
    try:
        async with traffic.client.stream("POST", f"{traffic.api}/v1/chat/completions", headers=traffic.headers,
                                         json=BAD_REQUESTS[what] | {"stream": True}) as response:
            if response.status_code < 300:
                outcome = "accepted" if traffic.peer else "error"
                traffic.record(Result("bad", outcome, started_s, detail=f"{what}: served ({response.status_code})"))
                return
            await response.aread()
    except httpx.HTTPError as error:
        traffic.record(Result("bad", "error", started_s, detail=f"{what}: {type(error).__name__}: {error}"))
        return
    if response.status_code == 503 and "retry-after" in response.headers:
        traffic.record(Result("bad", "overloaded", started_s))
    elif 400 <= response.status_code < 500 and openai_error_shape(response):
        traffic.record(Result("bad", "refused", started_s, detail=f"{what}: {response.status_code}"))
    else:
        traffic.record(Result("bad", "error", started_s,
                              detail=f"{what}: {response.status_code}, not a 4xx in OpenAI's error shape: "
                                     f"{response.text[:200]}"))


def openai_error_shape(response: httpx.Response) -> bool:
    """{"error": {"message": "...", "type": "...", ...}}, as OpenAI's API answers errors."""
    try:
        error = response.json()["error"]
        return isinstance(error["message"], str) and bool(error["message"]) and "type" in error
    except (ValueError, KeyError, TypeError):
        return False


async def tutorial_call(traffic: Traffic, rng: random.Random, client_id: int) -> None:
    """The Ray Serve tutorial's endpoint: POST /api/?prompt=..., the reply as plain text."""
    if not traffic.claim():
        return
    params = {"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(16, 128), **SAMPLING}
    started_s, text = traffic.since_start(), ""
    try:
        async with traffic.client.stream("POST", f"{traffic.api}/", params=params, headers=traffic.headers) as response:
            if response.status_code != 200:
                traffic.record(await refusal(response, "tutorial", started_s))
                return
            async for piece in response.aiter_text():
                text += piece
    except httpx.HTTPError as error:
        traffic.record(Result("tutorial", "error", started_s, detail=f"broken stream: {type(error).__name__}: {error}"))
        return
    traffic.record(Result("tutorial", "ok" if text.strip() else "error", started_s,
                          detail="" if text.strip() else "an empty reply"))


ACTIONS = {"stream": single_stream, "conversation": conversation, "abandoned": abandoned_stream,
           "bad": bad_request, "tutorial": tutorial_call}


async def client_loop(traffic: Traffic, client_id: int, seed: int) -> None:
    # One generator per client, seeded from the soak's seed: the same seed sends the same mix.
    rng = random.Random(seed * 1000 + client_id)
    kinds = [k for k in MIX if not traffic.peer or k in PEER_KINDS]
    weights = [MIX[k] for k in kinds]
    while time.perf_counter() < traffic.deadline and traffic.sent < traffic.max_requests:
        await ACTIONS[rng.choices(kinds, weights)[0]](traffic, rng, client_id)


class MemoryLog:
    """Readings of every process of a stack, each a dict: seconds since the soak's start, a
    label, per pid its role and RSS/PSS in MB, and the totals."""

    def __init__(self, scope: processes.StackScope):
        self.scope = scope
        self.samples: list[dict] = []

    def read(self, t_s: float, label: str) -> dict:
        table = processes.process_table()
        found = {}
        for pid in sorted(self.scope.members(table) - {os.getpid()}):  # not this tool, in a test session's tree
            if memory := processes.memory_kb(pid):
                found[str(pid)] = {"role": processes.role(table[pid], table),
                                   **{key.replace("_kb", "_mb"): round(kb / 1024, 1) for key, kb in memory.items()}}
        sample = {"t_s": round(t_s, 1), "label": label, "processes": found,
                  "total_rss_mb": round(sum(p["rss_mb"] for p in found.values()), 1),
                  "total_pss_mb": round(sum(p.get("pss_mb", 0) for p in found.values()), 1)}
        self.samples.append(sample)
        return sample


async def sample_periodically(memory: MemoryLog, traffic: Traffic, every: float, app: str) -> None:
    """A reading every `every` seconds until cancelled, on a thread: walking /proc must not
    stall the clients' event loop (their timings)."""
    while True:
        await asyncio.sleep(every)
        sample = await asyncio.to_thread(memory.read, traffic.since_start(), "during")
        errors = sum(r.outcome == "error" for r in traffic.results)
        engine = sum(p["rss_mb"] for p in sample["processes"].values() if is_engine(p["role"], app))
        print(f"{sample['t_s']:7.1f} s  {len(traffic.results):5} requests  {errors} unexpected errors  "
              f"engine RSS {engine:.0f} MB  stack RSS {sample['total_rss_mb']:.0f} MB", flush=True)


def is_engine(role: str, app: str) -> bool:
    """The engine processes the memory check is about: the measured application's (or the peer itself)."""
    return role in (f"engine ({app})", "llama-server")


async def warm_up(traffic: Traffic) -> None:
    """One short reply before the first reading: the RSS at start is that of a stack that has served."""
    result, _ = await chat_stream(traffic, "warm-up", [{"role": "user", "content": "Hello!"}], 16)
    if result.outcome != "ok":
        raise RuntimeError(f"the warm-up request failed: {result.outcome} {result.detail}")


async def soak(args: argparse.Namespace, api: str, scope: processes.StackScope, peer: bool) -> dict:
    memory = MemoryLog(scope)
    load_before = os.getloadavg()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key and not peer else {}
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=4 * args.clients)) as client:
        traffic = Traffic(client, api, headers, peer, deadline=float("inf"), max_requests=args.max_requests)
        await warm_up(traffic)
        traffic.started = time.perf_counter()
        traffic.deadline = traffic.started + args.duration
        await asyncio.to_thread(memory.read, 0.0, "start")
        sampler = asyncio.create_task(sample_periodically(memory, traffic, args.sample_every, args.app))
        try:
            await asyncio.gather(*(client_loop(traffic, i, args.seed) for i in range(args.clients)))
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        elapsed = traffic.since_start()
        # A moment for the server to let go of what the last abandoned streams held.
        await asyncio.sleep(2)
        await asyncio.to_thread(memory.read, traffic.since_start(), "end")
    # The machine is shared: what else ran shows in its load, which the timings depend on.
    return {"elapsed_s": round(elapsed, 1), "results": traffic.results, "memory": memory.samples,
            "load_average": {"start": [round(x, 1) for x in load_before], "end": [round(x, 1) for x in os.getloadavg()]}}


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 1)


def ttft_window(results: list[Result], start_s: float, end_s: float) -> dict:
    values = [r.ttft_ms for r in results if r.kind in OPENAI_STREAMS and r.ttft_ms is not None
              and start_s <= r.started_s < end_s]
    return {"from_s": round(start_s, 1), "to_s": round(end_s, 1), "streams": len(values),
            "p50_ms": round(statistics.median(values), 1) if values else None, "p90_ms": percentile(values, 0.9)}


def ttft_drift(results: list[Result]) -> dict:
    """Time to first token of the OpenAI streams started in the first and the last minute of the
    traffic (until the last request started: the replies still streaming after it are not
    traffic any more), a third of it each when it is shorter than three minutes."""
    end_s = max((r.started_s for r in results), default=0.0)
    window = min(60.0, end_s / 3)
    first, last = ttft_window(results, 0, window), ttft_window(results, end_s - window, end_s + 1)
    drift = round(last["p50_ms"] / first["p50_ms"], 2) if first["p50_ms"] and last["p50_ms"] else None
    return {"window_s": round(window, 1), "first": first, "last": last, "drift_p50": drift}


def request_counts(results: list[Result]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for result in results:
        kind = counts.setdefault(result.kind, {})
        kind[result.outcome] = kind.get(result.outcome, 0) + 1
    return counts


def process_rows(samples: list[dict]) -> list[dict]:
    """Per process (pid) seen in any reading: its role, RSS at the first and last reading it
    was in (None if it was not there at the start or the end), the largest, and PSS likewise."""
    start, end = samples[0]["processes"], samples[-1]["processes"]
    rows = {}
    for sample in samples:
        for pid, reading in sample["processes"].items():
            row = rows.setdefault(pid, {"pid": int(pid), "role": reading["role"], "max_rss_mb": 0.0})
            row["max_rss_mb"] = max(row["max_rss_mb"], reading["rss_mb"])
    for pid, row in rows.items():
        for when, readings in (("start", start), ("end", end)):
            row[f"{when}_rss_mb"] = readings.get(pid, {}).get("rss_mb")
            row[f"{when}_pss_mb"] = readings.get(pid, {}).get("pss_mb")
    return sorted(rows.values(), key=lambda r: (r["role"], r["pid"]))


def textbot_metrics(metrics_url: str, app: str) -> dict | None:
    """Textbot's samples (ray_textbot_*) for one application in the stack's Prometheus export:
    name -> a list of (tags, value), the tags without those Ray adds to every sample. None when
    the exporter does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError:
        return None
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("ray_textbot_") or sample.labels.get("application", app) != app:
                continue
            if sample.name.endswith("_bucket"):
                continue  # histograms' counts and sums are enough here
            tags = {k: v for k, v in sample.labels.items() if k not in RAY_TAGS and not k.startswith("otel_")}
            found.setdefault(sample.name, []).append({"tags": tags, "value": sample.value})
    return found


# Tags Ray adds to every sample: the same for all of one application's.
RAY_TAGS = {"application", "deployment", "Component", "SessionName", "Version", "WorkerId", "NodeAddress", "JobId"}


def per_replica_max(metrics: dict | None, name: str) -> float | None:
    """A gauge summed over its other tags within each replica, the largest replica's value."""
    if not metrics or name not in metrics:
        return None
    replicas: dict[str, float] = {}
    for sample in metrics[name]:
        replica = sample["tags"].get("replica", "")
        replicas[replica] = replicas.get(replica, 0.0) + sample["value"]
    return max(replicas.values())


def kv_budget(args: argparse.Namespace, metrics: dict | None) -> tuple[float | None, str]:
    if args.kv_budget_mb is not None:
        return args.kv_budget_mb, "--kv-budget-mb"
    if (budget := per_replica_max(metrics, "ray_textbot_kv_budget_bytes")) is not None:
        return round(budget / 2**20, 1), "ray_textbot_kv_budget_bytes"
    if args.app == "textbot" and (configured := deploy_kv_budget()) is not None:
        return configured
    return None, "none given (--kv-budget-mb) and no ray_textbot_kv_budget_bytes exported"


def deploy_kv_budget() -> tuple[float, str] | None:
    """The keys and values' memory per replica deploy.yaml gives the textbot application's default
    model, the one the soak's requests (which name no model) go to: its engine.kv_cache_mb."""
    from bench.__main__ import deployed

    return (float(deployed().default.engine.kv_cache_mb),
            "deploy.yaml's engine.kv_cache_mb, the default model's (no ray_textbot_kv_budget_bytes exported)")


def memory_check(rows: list[dict], app: str, budget_mb: float | None, source: str) -> dict:
    """Each engine process there at the start and at the end: RSS at the end <= (RSS at start +
    KV budget) x 1.10. Engines started during the soak (a second replica) have no start to
    compare with: listed, not checked."""
    engines = [r for r in rows if is_engine(r["role"], app)]
    checked = [r for r in engines if r["start_rss_mb"] is not None and r["end_rss_mb"] is not None]
    check = {"rule": f"end RSS <= (start RSS + KV budget) x {SLACK:.2f}", "kv_budget_mb": budget_mb,
             "kv_budget_source": source, "engines": []}
    for row in checked:
        limit = round((row["start_rss_mb"] + budget_mb) * SLACK, 1) if budget_mb is not None else None
        check["engines"].append({"pid": row["pid"], "start_rss_mb": row["start_rss_mb"], "end_rss_mb": row["end_rss_mb"],
                                 "limit_mb": limit, "met": None if limit is None else row["end_rss_mb"] <= limit})
    check["others"] = [r["pid"] for r in engines if r not in checked]
    verdicts = [e["met"] for e in check["engines"]]
    check["met"] = None if not verdicts or None in verdicts else all(verdicts)
    return check


def summarize(args: argparse.Namespace, run: dict, target: str, how: str, metrics: dict | None) -> dict:
    results: list[Result] = run["results"]
    errors = [r for r in results if r.outcome == "error"]
    rows = process_rows(run["memory"])
    budget_mb, source = kv_budget(args, metrics)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "settings": {"command": args.command,
                     "duration_s": args.duration, "clients": args.clients, "max_requests": args.max_requests,
                     "sample_every_s": args.sample_every, "seed": args.seed, "app": args.app,
                     "mix": {k: MIX[k] for k in MIX if target == "textbot" or k in PEER_KINDS}},
        "processes_found_by": how,
        "elapsed_s": run["elapsed_s"],
        "load_average": run["load_average"],
        "requests": request_counts(results),
        "total_requests": len(results),
        "unexpected_errors": {"count": len(errors), "examples": [asdict(r) for r in errors[:EXAMPLES_KEPT]]},
        "bad_requests_served": sorted({r.detail for r in results if r.outcome == "accepted"}),
        "ttft": ttft_drift(results),
        "processes": rows,
        "memory_samples": run["memory"],
        "metrics": metrics,
        "check": memory_check(rows, args.app, budget_mb, source),
    }


def scope_for(args: argparse.Namespace, port: int, launched: stack.LaunchedStack | None) -> processes.StackScope:
    """Which processes are the stack's: --pid's tree; the stack this tool started (its launcher's
    tree); else found from the process listening on the stack's port (bench/processes.py)."""
    if args.pid:
        return processes.scope_of_tree(args.pid)
    if launched:
        return processes.StackScope((launched.process.pid,), None,
                                    f"the process tree of the launcher this tool started (pid {launched.process.pid})")
    listener = processes.listening_pid(port)
    if listener is None:
        raise RuntimeError(f"no process of this user listens on port {port}: pass --pid")
    return processes.scope_from_listener(listener, processes.process_table())


def url_port(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def soak_textbot(args: argparse.Namespace) -> dict:
    api = args.url.rstrip("/") + "/" + args.api_path.strip("/")
    api = api.rstrip("/")
    page = args.url.rstrip("/") + "/" + args.page_path.strip("/")
    with contextlib.ExitStack() as exits:
        launched = None
        if not stack.healthy(api):
            if args.no_start:
                raise SystemExit(f"No stack answers at {api} (--no-start).")
            print(f"No stack answers at {api} - starting `python -m backend.launch deploy.yaml`, as `make run` does",
                  flush=True)
            launched = exits.enter_context(stack.launched_stack(args.url, api, page))
            if launched.why:
                raise SystemExit(f"Could not start a stack: {launched.why}")
        scope = scope_for(args, url_port(args.url), launched)
        metrics_url = args.metrics_url or (f"http://127.0.0.1:{launched.metrics_port}/metrics" if launched
                                           else "http://127.0.0.1:8080/metrics")
        print(f"Soaking {api} for {args.duration:.0f} s with {args.clients} clients; its processes: {scope.how}.",
              flush=True)
        run = asyncio.run(soak(args, api, scope, peer=False))
        metrics = textbot_metrics(metrics_url, args.app)
    return summarize(args, run, "textbot", scope.how, metrics) | {"url": api, "metrics_url": metrics_url,
                                                                  "started_stack": launched is not None}


def soak_llamacpp(args: argparse.Namespace) -> dict:
    """The same traffic (no tutorial endpoint) against llama-server on the GGUF file deploy.yaml's
    model is, as `python -m bench` starts it, with 8 slots and 16384 tokens of context."""
    from bench import llamacpp_build
    from bench.__main__ import (
        LLAMACPP_MISSING,
        deployed,
        gguf_path,
        llamacpp_binary,
        llamacpp_command,
        llamacpp_context,
        llamacpp_server,
        torch_threads,
    )

    model = deployed().default  # the soak's requests name no model: the default's
    server, gguf = llamacpp_binary(), gguf_path(model.model_settings())
    if server is None:
        raise SystemExit(LLAMACPP_MISSING)
    if gguf is None:
        raise SystemExit(f"the model ({model.source}) is not a GGUF file, which llama.cpp needs")
    slots = model.engine.max_running
    context = llamacpp_context(slots, 256)
    threads = args.llamacpp_threads or torch_threads(model)
    command_for = lambda port: llamacpp_command(server, gguf, port, threads, slots, context)  # noqa: E731
    args.app = "llama-server"  # the process the memory check is about
    with llamacpp_server(command_for) as url:
        port = url_port(url)
        scope = processes.scope_of_tree(args.pid) if args.pid else processes.scope_from_listener(
            processes.listening_pid(port), processes.process_table())
        print(f"Soaking llama-server at {url} for {args.duration:.0f} s with {args.clients} clients; "
              f"its processes: {scope.how}.", flush=True)
        run = asyncio.run(soak(args, url, scope, peer=True))
    command = " ".join(llamacpp_command(Path(server.name), Path(gguf.name), port, threads, slots, context))
    return summarize(args, run, "llamacpp", scope.how, None) | {
        "url": url, "server_command": command, "llamacpp_version": llamacpp_build.version_line(server)}


def mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def run_markdown(run: dict) -> list[str]:
    """One soak's tables."""
    name = "Textbot" if run["target"] == "textbot" else "llama.cpp's llama-server"
    settings, ttft, check = run["settings"], run["ttft"], run["check"]
    lines = [f"## {name}", "",
             f"`{settings['command']}` on {run['date']}: {run['elapsed_s']:.0f} s, {settings['clients']} clients, "
             f"seed {settings['seed']}" + (f"; `{run['server_command']}`" if run.get("server_command") else "") + ".",
             f"Processes: {run['processes_found_by']}. Load average (1, 5, 15 min) at the start "
             f"{run['load_average']['start']}, at the end {run['load_average']['end']}, on {os.cpu_count()} cores.", "",
             "| kind | " + " | ".join(EXPECTED_OUTCOMES + ("error",)) + " |",
             "| --- |" + " ---: |" * (len(EXPECTED_OUTCOMES) + 1)]
    for kind, outcomes in sorted(run["requests"].items()):
        lines.append(f"| {kind} | " + " | ".join(str(outcomes.get(o, 0)) for o in EXPECTED_OUTCOMES + ("error",)) + " |")
    lines += ["", f"Unexpected errors: **{run['unexpected_errors']['count']}**"
              + "".join(f"\n- {e['kind']} at {e['started_s']:.0f} s: {e['detail']}"
                        for e in run["unexpected_errors"]["examples"][:5]), "",
              f"Time to first token (OpenAI streams) in the first and last {ttft['window_s']:.0f} s: "
              f"median {ttft['first']['p50_ms']} and {ttft['last']['p50_ms']} ms (drift "
              f"{'—' if ttft['drift_p50'] is None else str(ttft['drift_p50']) + 'x'}), "
              f"p90 {ttft['first']['p90_ms']} and {ttft['last']['p90_ms']} ms "
              f"({ttft['first']['streams']} and {ttft['last']['streams']} streams).", "",
              *([f"Bad requests it served rather than refused (not counted as its errors): "
                 f"{'; '.join(run['bad_requests_served'])}.", ""] if run.get("bad_requests_served") else []),
              "| process | pid | RSS start MB | RSS end MB | RSS max MB | PSS start MB | PSS end MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in run["processes"]:
        lines.append(f"| {row['role']} | {row['pid']} | {mb(row['start_rss_mb'])} | {mb(row['end_rss_mb'])} | "
                     f"{mb(row['max_rss_mb'])} | {mb(row['start_pss_mb'])} | {mb(row['end_pss_mb'])} |")
    samples = run["memory_samples"]
    lines.append(f"| **all** | | {mb(samples[0]['total_rss_mb'])} | {mb(samples[-1]['total_rss_mb'])} | "
                 f"{mb(max(s['total_rss_mb'] for s in samples))} | {mb(samples[0]['total_pss_mb'])} | "
                 f"{mb(samples[-1]['total_pss_mb'])} |")
    engine_series = ", ".join(f"{s['t_s']:.0f} s: {mb(sum(p['rss_mb'] for p in s['processes'].values() if is_engine(p['role'], settings['app'])))}"
                              for s in samples)
    lines += ["", f"Engine RSS (MB) over time: {engine_series}.", ""]
    verdict = {True: "met", False: "**missed**", None: "not decided"}[check["met"]]
    for engine in check["engines"]:
        lines.append(f"Check {check['rule']}: engine pid {engine['pid']}: {mb(engine['start_rss_mb'])} -> "
                     f"{mb(engine['end_rss_mb'])} MB, limit {mb(engine['limit_mb'])} MB.")
    lines += [f"KV budget: {check['kv_budget_mb']} MB ({check['kv_budget_source']}). Memory check: {verdict}.", ""]
    if run.get("metrics"):
        lines += ["Prometheus at the end (ray_textbot_*, summed over tags):", ""]
        for metric, samples_ in sorted(run["metrics"].items()):
            if any(word in metric for word in ("rss", "kv_", "prefix", "memory", "bytes")):
                for sample in samples_:
                    tags = ",".join(f"{k}={v}" for k, v in sample["tags"].items() if k != "replica")
                    lines.append(f"- {metric}{{{tags}}} = {sample['value']:.0f}")
        lines.append("")
    return lines


def write_outputs(out: Path, run: dict) -> Path:
    """<out>.json (or <out>-llamacpp.json) for this run; <out>.md from whichever runs are there,
    so that Textbot's figures and llama-server's sit side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    own = out.with_name(out.name + ("-llamacpp" if run["target"] == "llamacpp" else "") + ".json")
    own.write_text(json.dumps(run, indent=2, default=str))
    lines = ["# Soak: mixed traffic, errors and memory", "",
             "Written by `python -m bench.soak` (see its --help); the JSON beside it holds every reading.", ""]
    for name in (out.name + ".json", out.name + "-llamacpp.json"):
        if (path := out.with_name(name)).is_file():
            lines += run_markdown(json.loads(path.read_text()))
    markdown = out.with_name(out.name + ".md")
    markdown.write_text("\n".join(lines))
    return markdown


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.soak", *(sys.argv[1:] if argv is None else argv)])
    run = soak_llamacpp(args) if args.peer == "llamacpp" else soak_textbot(args)
    markdown = write_outputs(args.out, run)
    print("\n".join(run_markdown(run)))
    print(f"Wrote {markdown}", flush=True)
    return run


if __name__ == "__main__":
    main()
