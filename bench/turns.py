"""`python -m bench.turns`: a conversation's time to first token turn by turn, in-process.

One conversation of --turns turns (the whole history each turn, as a chat client sends it) to
the engine on one model, its prefix cache on, greedy: each turn's prompt tokens, the tokens read
from the cache, and its time to first token against turn 1's. The served measurement, with Serve's
router and two replicas, is bench.conversations; this one takes any model (`--model`) in a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from bench.conversations import QUESTIONS


def main(argv: list[str] | None = None) -> list[dict]:
    from backend.engine import Engine
    from backend.engine.loading import load
    from backend.protocol import ChatMessage, ResolvedSampling
    from backend.settings import EngineSettings, ModelSettings

    parser = argparse.ArgumentParser(prog="python -m bench.turns", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model source, as model.source in deploy.yaml takes it")
    parser.add_argument("--turns", type=int, default=10, choices=range(2, len(QUESTIONS) + 1), metavar="2-12")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a model replica)")
    args = parser.parse_args(argv)
    engine = Engine(load(ModelSettings(source=args.model, compile=True)), EngineSettings(), torch_threads=args.threads)
    sampling = ResolvedSampling(max_new_tokens=args.reply_tokens, temperature=0.0, top_p=1.0)

    async def converse() -> list[dict]:
        history, turns = [], []
        for question in QUESTIONS[:args.turns]:
            history.append(ChatMessage(role="user", content=question))
            started, first, reply = time.perf_counter(), None, ""
            generation = engine.submit(history, sampling)
            async for piece in generation:
                first = first if first is not None else time.perf_counter() - started
                reply += piece
            history.append(ChatMessage(role="assistant", content=reply))
            turns.append({"prompt_tokens": generation.prompt_tokens, "cached_tokens": generation.cached_tokens,
                          "ttft_ms": round(1000 * (first or 0.0), 1)})
        return turns

    try:
        turns = asyncio.run(converse())
    finally:
        engine.shutdown()
    for number, turn in enumerate(turns, 1):
        print(f"turn {number}: {turn['prompt_tokens']} prompt tokens, {turn['cached_tokens']} from the cache, "
              f"first token after {turn['ttft_ms']} ms, {turn['ttft_ms'] / turns[0]['ttft_ms']:.2f}x turn 1")
    return turns


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
