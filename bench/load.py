"""The load generator: `concurrency` streaming clients at once, each sending its
share of fixed prompts one after another, timing every piece as it arrives."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from bench.clients import Stream

PROMPTS = [
    "Tell me a story about a fox who learns to fly.",
    "Explain how a rainbow forms, step by step.",
    "Write a short poem about the sea at night.",
    "Describe a busy market in a small town.",
    "What makes a good cup of tea? Give advice.",
    "Tell me about the life of a honeybee.",
    "Describe the view from a mountain top at dawn.",
    "Write a letter to a friend about a trip to the coast.",
]


@dataclass
class Request:
    started: float
    arrivals: list[float] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    error: str | None = None


async def run_one(stream: Stream, prompt: str, max_tokens: int) -> Request:
    request = Request(started=time.perf_counter())
    try:
        async for piece in stream(prompt, max_tokens):
            request.arrivals.append(time.perf_counter())
            request.text += piece
    except Exception as error:  # noqa: BLE001 - counted and reported, the run goes on
        request.error = f"{type(error).__name__}: {error}"[:200]
    return request


async def run_level(stream: Stream, concurrency: int, requests_per_client: int, max_tokens: int,
                    count_tokens) -> dict:
    """All clients start together; returns the level's statistics."""

    async def client(index: int) -> list[Request]:
        done = []
        for round_ in range(requests_per_client):
            prompt = PROMPTS[(index + round_ * concurrency) % len(PROMPTS)]
            done.append(await run_one(stream, prompt, max_tokens))
        return done

    started = time.perf_counter()
    results = [r for batch in await asyncio.gather(*map(client, range(concurrency))) for r in batch]
    wall = time.perf_counter() - started
    for request in results:
        request.tokens = count_tokens(request.text)
    return summarize(results, concurrency, wall)


def summarize(requests: list[Request], concurrency: int, wall: float) -> dict:
    ok = [r for r in requests if r.error is None and r.arrivals]
    ttft = [r.arrivals[0] - r.started for r in ok]
    # Gaps between pieces, spread over the tokens each piece carried (a streamer that
    # sends whole words would otherwise look slower per token than it is).
    itl = [gap for r in ok if r.tokens > 1 for gap in _per_token_gaps(r)]
    per_stream = [(r.tokens - 1) / (r.arrivals[-1] - r.arrivals[0]) for r in ok
                  if r.tokens > 1 and r.arrivals[-1] > r.arrivals[0]]
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "errors": len(requests) - len(ok),
        "error_examples": sorted({r.error for r in requests if r.error})[:3],
        "output_tokens": sum(r.tokens for r in ok),
        "wall_s": round(wall, 3),
        "ttft_p50_ms": _ms(_pct(ttft, 50)),
        "ttft_p95_ms": _ms(_pct(ttft, 95)),
        "itl_p50_ms": _ms(_pct(itl, 50)),
        "itl_p95_ms": _ms(_pct(itl, 95)),
        "per_stream_tok_s": round(statistics.mean(per_stream), 2) if per_stream else None,
        "aggregate_tok_s": round(sum(r.tokens for r in ok) / wall, 2) if wall else None,
    }


def _per_token_gaps(request: Request) -> list[float]:
    pieces = len(request.arrivals)
    tokens_per_piece = max(1.0, (request.tokens - 1) / max(1, pieces - 1))
    return [(b - a) / tokens_per_piece for a, b in zip(request.arrivals, request.arrivals[1:])]


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def alternate(names: list[str], streams: int) -> list[str]:
    """Which model each of `streams` concurrent streams asks: the models in turn (a, b, a, b, ...)."""
    return [names[i % len(names)] for i in range(streams)]


async def run_mixed(streams: dict[str, Stream], count_tokens: dict[str, object], concurrency: int,
                    max_tokens: int) -> dict:
    """`concurrency` streams at once over several models (streams: model name -> its client), each
    stream one request, the models in turn (`alternate`); all start together. The statistics of
    all of them (`all`) and of each model's (`models`), over the same wall-clock time, so the
    models' aggregates add up to the whole's."""
    assigned = alternate(list(streams), concurrency)
    started = time.perf_counter()
    requests = await asyncio.gather(*(run_one(streams[name], PROMPTS[i % len(PROMPTS)], max_tokens)
                                      for i, name in enumerate(assigned)))
    wall = time.perf_counter() - started
    for request, name in zip(requests, assigned):
        request.tokens = count_tokens[name](request.text)
    return {"concurrency": concurrency, "assigned": assigned, "all": summarize(list(requests), concurrency, wall),
            "models": {name: summarize([r for r, n in zip(requests, assigned) if n == name], assigned.count(name), wall)
                       for name in streams}}
