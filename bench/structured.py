"""What structured output costs: `python -m bench.structured`.

In-process, on the default model (its deploy.yaml settings), greedy, one request at a time:

A. the grammar's own work per token: a schema reply's tokens replayed through a fresh
   constraint, timing `mask` (compute the allowed tokens, set the rest to -inf) and
   `advance` (consume the chosen token) for each, against a logits row of the vocabulary;
B. decode time per token, the same prompt free, under `json_object` and under a
   `json_schema`, side by side in rounds (the machine is shared; medians of the rounds).

Writes docs/benchmarks/structured.json and docs/benchmarks/structured.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from backend.protocol import ChatMessage, OutputSchema, ResolvedSampling
from bench.report import write_side_study

ROOT = Path(__file__).resolve().parent.parent
# A prompt the model answers with JSON when free (greedy, int4 and float32 alike; some wordings
# get a run of emoji instead), so the three replies are alike and their steps comparable.
PROMPT = [ChatMessage(role="user", content="Invent a person: give their name, age and city as JSON.")]
PERSON = {"type": "object", "required": ["name", "age", "city"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130}, "city": {"type": "string"}}}
MODES = {"free": None, "json_object": OutputSchema(json_schema={"type": "object"}),
         "json_schema": OutputSchema(json_schema=PERSON, strict=True)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="of B (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=96, help="per reply (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be at least 1 and --max-tokens at least 2")
    return args


async def timed_reply(engine, sampling: ResolvedSampling) -> dict:
    generation = engine.submit(PROMPT, sampling)
    started = time.perf_counter()
    first = None
    text = ""
    async for piece in generation:
        first = first or time.perf_counter()
        text += piece
    steps = generation.completion_tokens - 1
    return {"text": text, "tokens": generation.completion_tokens, "finish_reason": generation.finish_reason,
            "first_token_ms": round((first - started) * 1000, 1),
            "ms_per_token": round((time.perf_counter() - first) * 1000 / steps, 2) if steps > 0 else None}


def grammar_work(engine, text: str) -> dict:
    """A: replay `text`'s tokens through a fresh constraint, timing each step's grammar work."""
    from backend.engine.constraint import Constraint

    ids = engine.loaded.tokenizer.encode(text, add_special_tokens=False)
    constraint = Constraint(engine.vocabulary, engine.vocabulary.grammar(MODES["json_schema"]))
    logits = torch.randn(engine.vocab_size)
    masks, advances = [], []
    for token in ids:
        started = time.perf_counter()
        constraint.mask(logits)
        masked = time.perf_counter()
        constraint.advance(token)
        masks.append((masked - started) * 1e6)
        advances.append((time.perf_counter() - masked) * 1e6)
    return {"tokens": len(ids), "mask_us_median": round(statistics.median(masks), 1),
            "mask_us_p90": round(sorted(masks)[int(0.9 * (len(masks) - 1))], 1),
            "advance_us_median": round(statistics.median(advances), 1)}


def report(run: dict) -> str:
    lines = [f"# Structured output: what a schema costs ({run['date']})", "",
             f"Default model, in-process, greedy, up to {run['max_tokens']} tokens, {run['rounds']} rounds side by "
             "side; `python -m bench.structured`.", "",
             "## The grammar's work per token (A)", "",
             "| tokens replayed | mask, median | mask, p90 | advance, median |", "| ---: | ---: | ---: | ---: |",
             "| {tokens} | {mask_us_median} µs | {mask_us_p90} µs | {advance_us_median} µs |".format(**run["grammar"]),
             "", "## Decode time per token (B, medians of the rounds)", "",
             "| reply | tokens | ms a token | vs free | first token | finish | text |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    free = run["modes"]["free"]["ms_per_token"]
    for mode, row in run["modes"].items():
        lines.append(f"| {mode} | {row['tokens']} | {row['ms_per_token']} | {row['ms_per_token'] / free:.2f}x | "
                     f"{row['first_token_ms']} ms | {row['finish_reason']} | {json.dumps(row['text'][:60])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from backend.engine import Engine, load
    from bench.__main__ import deployed

    model = deployed().default
    engine = Engine(load(model.model_settings()), model.engine, model.torch_threads)
    greedy = ResolvedSampling(max_new_tokens=args.max_tokens, temperature=0.0, top_p=1.0)
    rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, schema in MODES.items():
            rounds[mode].append(asyncio.run(timed_reply(engine, greedy.model_copy(update={"output_schema": schema}))))
    modes = {mode: runs[0] | {key: statistics.median(r[key] for r in runs) for key in ("ms_per_token", "first_token_ms")}
             for mode, runs in rounds.items()}
    run = {"date": datetime.date.today().isoformat(), "rounds": args.rounds, "max_tokens": args.max_tokens,
           "grammar": grammar_work(engine, modes["json_schema"]["text"]), "modes": modes}
    engine.shutdown()
    write_side_study(args.out, "structured", run, report(run))


if __name__ == "__main__":
    main()
