"""Textbot's own metrics and its one log line per request.

The metrics go through `ray.serve.metrics`, so Ray tags them with the
application, deployment and replica, aggregates them across replicas and nodes,
and exports them for Prometheus with its own (`make run`: http://127.0.0.1:8080/metrics,
names prefixed `ray_`). They are recorded in the model replica, where the tokens are.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from ray.serve import metrics

# Serve's logger: its lines carry the request id, application, deployment and replica.
request_log = logging.getLogger("ray.serve")

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_GAPS = [0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5]


class ReplyMetrics:
    """One per Textbot replica; every figure carries the replica's `model` label (besides Ray's
    application, deployment and replica), so dashboards can group by model."""

    def __init__(self, model: str):
        def tagged(kind, name: str, tag_keys: tuple[str, ...] = (), **options):
            metric = kind(name, tag_keys=(*tag_keys, "model"), **options)
            metric.set_default_tags({"model": model})
            return metric

        self.model = model
        self.time_to_first_token = tagged(metrics.Histogram,
            "textbot_time_to_first_token_seconds", description="From submission to the first text piece.",
            boundaries=SECONDS)
        self.inter_token = tagged(metrics.Histogram,
            "textbot_inter_token_latency_seconds", description="Between consecutive tokens of one reply.",
            boundaries=TOKEN_GAPS)
        self.duration = tagged(metrics.Histogram,
            "textbot_request_duration_seconds", description="From submission to the reply's end.",
            boundaries=SECONDS)
        self.prompt_tokens = tagged(metrics.Counter, "textbot_prompt_tokens", description="Prompt tokens of replies started.")
        self.completion_tokens = tagged(metrics.Counter, "textbot_completion_tokens", description="Tokens generated.")
        self.finished = tagged(metrics.Counter,
            "textbot_requests_finished", description="Replies ended, by finish reason: stop, length, "
            "cancelled (the client left or pressed Stop), error.", tag_keys=("finish_reason",))
        self.refused = tagged(metrics.Counter,
            "textbot_requests_refused", description="Requests refused before generating, by kind: "
            "overloaded, context_length_exceeded, invalid_request.", tag_keys=("kind",))
        self.running = tagged(metrics.Gauge, "textbot_requests_running", description="Replies decoding in the batch.")
        self.waiting = tagged(metrics.Gauge, "textbot_requests_waiting", description="Replies waiting for a batch place.")
        self.prefix_cache = {
            "queried_tokens": tagged(metrics.Counter, "textbot_prefix_cache_queried_tokens",
                                              description="Prompt tokens looked up in the prefix cache."),
            "hit_tokens": tagged(metrics.Counter, "textbot_prefix_cache_hit_tokens",
                                          description="Prompt tokens read from the prefix cache, not computed."),
            "evictions": tagged(metrics.Counter, "textbot_prefix_cache_evictions",
                                         description="Prefix cache entries dropped to stay within its budget."),
        }
        self.prefix_cache_bytes = tagged(metrics.Gauge, "textbot_prefix_cache_bytes",
                                                description="Bytes of keys and values the prefix cache holds.")
        self._prefix_cache_reported = {name: 0 for name in self.prefix_cache}
        self.engine_rss = tagged(metrics.Gauge, "textbot_engine_rss_bytes",
                                        description="Resident memory of the replica's engine process.")
        self.kv_budget = tagged(metrics.Gauge, "textbot_kv_budget_bytes", description="The replica's KV budget "
                                       "(engine.kv_cache_mb): what its keys and values may take, all of them.")
        self.kv_used = tagged(metrics.Gauge,
            "textbot_kv_used_bytes", description="Keys and values held, by part: rows (replies running and "
            "prompts being read) and prefix_cache (finished replies').", tag_keys=("part",))
        self.kv_peak = tagged(metrics.Gauge, "textbot_kv_peak_bytes",
                                     description="The most keys and values held at once since the replica started.")

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def set_prefix_cache(self, stats) -> None:
        """Bring the counters up to the engine's running totals (a PrefixCacheStats)."""
        for name, counter in self.prefix_cache.items():
            total = getattr(stats, name)
            _add(counter, total - self._prefix_cache_reported[name])
            self._prefix_cache_reported[name] = total
        self.prefix_cache_bytes.set(stats.bytes)

    def set_memory(self, engine_rss: int, kv: dict | None) -> None:
        """The engine process's resident memory and its KV usage (an engine.KvUsage as a dict), as last reported."""
        if engine_rss:
            self.engine_rss.set(engine_rss)
        if kv:
            self.kv_budget.set(kv["budget"])
            self.kv_used.set(kv["rows"], tags={"part": "rows"})
            self.kv_used.set(kv["prefix_cache"], tags={"part": "prefix_cache"})
            self.kv_peak.set(kv["peak"])

    async def observe(self, generation, started: float, route: str, report) -> AsyncIterator[str]:
        """Pass a generation's pieces through, timing them; log one line when it ends.
        `report()` brings the replica's gauges up to date."""
        report()
        if generation.index == 0:  # replies to one prompt (`n`) read it once
            _add(self.prompt_tokens, generation.prompt_tokens)
        first = last = None
        counted = 0
        error = None
        try:
            async for piece in generation:
                now = time.monotonic()
                if first is None:
                    first = now
                    self.time_to_first_token.observe(now - started)
                    report()
                elif generation.tokens_streamed > counted:
                    # A piece can carry several tokens (held back to complete a character).
                    gap = (now - last) / (generation.tokens_streamed - counted)
                    for _ in range(generation.tokens_streamed - counted):
                        self.inter_token.observe(gap)
                last, counted = now, generation.tokens_streamed
                yield piece
        except Exception as exc:
            error = exc
            raise
        finally:
            reason = generation.finish_reason or ("error" if error else "cancelled")
            duration = time.monotonic() - started
            self.duration.observe(duration)
            _add(self.completion_tokens, generation.completion_tokens)
            self.finished.inc(tags={"finish_reason": reason})
            report()
            request_log.info(json.dumps({
                "event": "reply", "model": self.model, "route": route, "choice": generation.index, "prompt_tokens": generation.prompt_tokens,
                "cached_tokens": generation.cached_tokens,
                "completion_tokens": generation.completion_tokens,
                "time_to_first_token_ms": None if first is None else round((first - started) * 1000, 1),
                "duration_ms": round(duration * 1000, 1), "finish_reason": reason,
                "error": None if error is None else f"{type(error).__name__}: {error}",
            }))


def _add(counter: metrics.Counter, value: int) -> None:
    if value > 0:  # Ray's Counter.inc refuses 0
        counter.inc(value)
