"""Conversations and the prefix cache, measured through the OpenAI route: `python -m bench.conversations`.

Starts its own Ray and Serve with three copies of deploy.yaml's `textbot` application:
`off` (prefix cache off, one replica), `on` (as deploy.yaml, two replicas, its router) and
`budget` (a small KV budget, one replica). Then, one after another:

A. one conversation of --turns turns, the client sending the whole history each turn,
   through `off` and through `on`: each turn's prompt tokens, cached tokens and time to
   first token, and whether the replies are the same (greedy);
B. --conversations conversations of --turns turns at once on `on`'s two replicas, each
   with its x-session-id: the prompt-token hit ratio from turn 2 on, and how many
   conversations found their previous turn in the cache every turn (as they do only on
   the replica that served it);
C. --budget-conversations conversations of 3 turns against `budget`: the replica's resident
   memory before and after, the bytes the cache holds, its evictions, and failures.

And first, in-process, D: the same --turns turns (one history, replies from the cache-off
engine) to a cache-on and a cache-off engine on one model, per weight configuration: how
many replies are identical, and how many tokens agree before the first difference.

Writes docs/benchmarks/conversations.json and docs/benchmarks/conversations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import json
import socket
import time
from pathlib import Path

import httpx

from backend.config import DeployConfig
from backend.settings import deployment_name
from bench.report import write_side_study

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Hi! Can you tell me about the solar system?", "Which planet is the largest?", "And the smallest?",
    "How far is Mars from the Sun?", "Could people live there one day?", "What would they need?",
    "How long does the trip take?", "What is the Moon made of?", "Why does it have craters?",
    "Thank you. Can you sum up what we talked about?", "One more: what is a comet?", "And an asteroid?",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.conversations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10, choices=range(2, len(QUESTIONS) + 1), metavar="2-12")
    parser.add_argument("--reply-tokens", type=int, default=120, help="per reply in A (default %(default)s)")
    parser.add_argument("--conversations", type=int, default=8, help="at once in B (default %(default)s)")
    parser.add_argument("--concurrent-reply-tokens", type=int, default=48, help="per reply in B and C")
    parser.add_argument("--budget-conversations", type=int, default=50, help="in C (default %(default)s)")
    parser.add_argument("--budget-mb", type=float, default=128,
                        help="the KV budget (engine.kv_cache_mb: rows and prefix cache) in C (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    for name in ("reply_tokens", "conversations", "concurrent_reply_tokens", "budget_conversations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.budget_mb <= 0:
        parser.error("--budget-mb must be above 0")
    return args


def applications(budget_mb: float) -> list[dict]:
    """deploy.yaml's textbot application three times, serving its default model alone: cache off,
    as shipped on two replicas, a small KV budget."""
    config = DeployConfig.read(ROOT / "deploy.yaml")
    shipped, default = config.app("textbot"), config.textbot("textbot").default
    apps = []
    for name, engine, replicas in (("off", {"prefix_cache": False}, 1), ("on", {}, 2),
                                   ("budget", {"kv_cache_mb": budget_mb}, 1)):
        model = default.model_copy(update={
            "engine": default.engine.model_copy(update=engine),
            "deployment": default.deployment.model_copy(update={"autoscaling_config": None, "num_replicas": replicas})})
        app = copy.deepcopy(shipped) | {"name": name, "route_prefix": f"/{name}"}
        app["args"] = {key: value for key, value in app["args"].items() if key not in ("model", "engine")}
        app["args"]["models"] = [model.model_dump(mode="json")]
        apps.append(app)
    return apps


async def turn(client: httpx.AsyncClient, app: str, history: list[dict], max_tokens: int,
               session: str | None) -> dict:
    """One streamed turn: its reply, usage and time to first token."""
    body = {"messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, reply, usage = time.perf_counter(), None, "", None
    headers = {"x-session-id": session} if session else {}
    async with client.stream("POST", f"/{app}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"{response.status_code}: {response.text[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            for choice in chunk["choices"]:
                if piece := choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    reply += piece
            usage = chunk.get("usage") or usage
    return {"reply": reply, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "ttft_ms": round(((first or time.perf_counter()) - started) * 1000, 1)}


async def conversation(client, app: str, turns: int, max_tokens: int, session: str | None,
                       opening: str = "") -> list[dict]:
    history, results = [], []
    for question in QUESTIONS[:turns]:
        history.append({"role": "user", "content": opening + question})
        opening = ""
        result = await turn(client, app, history, max_tokens, session)
        results.append(result)
        if "error" in result:
            break
        history.append({"role": "assistant", "content": result["reply"]})
    return results


def followed(turns: list[dict]) -> bool:
    """Every turn found its previous turn's prompt in the cache: it met the replica that served it."""
    return all("error" not in t for t in turns) and all(
        t["cached_tokens"] >= previous["prompt_tokens"] for previous, t in zip(turns, turns[1:]))


async def measure(url: str, args: argparse.Namespace, replica_stats) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await turn(client, "off", [{"role": "user", "content": "Warm up."}], 4, None)
        await turn(client, "on", [{"role": "user", "content": "Warm up."}], 4, None)
        single = {app: await conversation(client, app, args.turns, args.reply_tokens, "single")
                  for app in ("off", "on")}

        started = time.perf_counter()
        many = await asyncio.gather(*(
            conversation(client, "on", args.turns, args.concurrent_reply_tokens, f"conversation-{i}",
                         opening=f"(Conversation {i}.) ") for i in range(args.conversations)))
        many_s = time.perf_counter() - started
        later = [t for turns in many for t in turns[1:] if "error" not in t]

        await turn(client, "budget", [{"role": "user", "content": "Warm up."}], 4, None)
        before = await replica_stats("budget")
        limit = asyncio.Semaphore(8)

        async def bounded(i: int) -> list[dict]:
            async with limit:
                return await conversation(client, "budget", 3, args.concurrent_reply_tokens, f"budget-{i}",
                                          opening=f"(Visitor {i}.) ")
        budget_runs = await asyncio.gather(*(bounded(i) for i in range(args.budget_conversations)))
        after = await replica_stats("budget")

    return {
        "single": {app: [{k: v for k, v in t.items() if k != "reply"} for t in turns] for app, turns in single.items()},
        "single_replies_identical": [t.get("reply") for t in single["off"]] == [t.get("reply") for t in single["on"]],
        "concurrent": {
            "conversations": args.conversations, "turns": args.turns, "seconds": round(many_s, 1),
            "hit_ratio_from_turn_2": round(sum(t["cached_tokens"] for t in later)
                                           / max(1, sum(t["prompt_tokens"] for t in later)), 3),
            "conversations_on_their_replica": sum(map(followed, many)),
            "errors": sum("error" in t for turns in many for t in turns),
        },
        "budget": {
            "conversations": args.budget_conversations, "budget_mb": args.budget_mb,
            "rss_mb_before": before["rss_mb"], "rss_mb_after": after["rss_mb"],
            "cache_mb_held": round(after["prefix_cache"]["bytes"] / 2**20, 1),
            "evictions": after["prefix_cache"]["evictions"],
            "errors": sum("error" in t for turns in budget_runs for t in turns),
            "turns": sum(len(turns) for turns in budget_runs),
        },
    }


def agreement(turns: int, reply_tokens: int) -> list[dict]:
    """D: greedy replies with the cache on against off, turn by turn on one history."""
    from backend.engine import Engine, load
    from backend.protocol import ChatMessage, ResolvedSampling
    from backend.settings import EngineSettings, ModelSettings

    greedy = ResolvedSampling(max_new_tokens=reply_tokens, temperature=0.0, top_p=1.0)
    rows = []
    for quantization in ("int4", "none"):
        loaded = load(ModelSettings(quantization=quantization))
        on, off = Engine(loaded), Engine(loaded, EngineSettings(prefix_cache=False))

        async def reply(engine, history) -> list[int]:
            text = "".join([piece async for piece in engine.submit(history, greedy)])
            return text, loaded.tokenizer.encode(text)

        async def compare() -> dict:
            history, identical, agreed, total = [], 0, 0, 0
            for question in QUESTIONS[:turns]:
                history.append(ChatMessage(role="user", content=question))
                (text, expected), (_, got) = await reply(off, history), await reply(on, history)
                same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
                identical += expected == got
                agreed, total = agreed + same, total + len(expected)
                history.append(ChatMessage(role="assistant", content=text))
            return {"quantization": quantization, "identical_replies": identical, "turns": turns,
                    "tokens_before_first_difference": agreed, "tokens": total}
        try:
            rows.append(asyncio.run(compare()))
        finally:
            on.shutdown(), off.shutdown()
    return rows


def report(run: dict) -> str:
    a, b, c = run["single"], run["concurrent"], run["budget"]
    lines = [
        "# Conversations and the prefix cache", "",
        f"Generated by `{run['command']}` on {run['date']}, through the OpenAI route "
        f"(streamed, greedy, {run['settings']['reply_tokens']}-token replies in A). Same run, one after another: "
        "compare ratios.", "",
        "## A. One conversation, the whole history sent every turn", "",
        "Each conversation grows from its own replies (they may differ: D), so each has its own prompt tokens.", "",
        "| turn | cache off: prompt tokens | TTFT ms | cache on: prompt tokens | cached | TTFT ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (off, on) in enumerate(zip(a["off"], a["on"]), 1):
        lines.append(f"| {i} | {off.get('prompt_tokens')} | {off.get('ttft_ms')} | {on.get('prompt_tokens')} "
                     f"| {on.get('cached_tokens')} | {on.get('ttft_ms')} |")
    last, first = len(a["on"]) - 1, 0
    ratio = lambda rows: rows[last]["ttft_ms"] / rows[first]["ttft_ms"]  # noqa: E731
    lines += ["", f"Last turn's TTFT over the first's: cache off {ratio(a['off']):.1f}x, on {ratio(a['on']):.1f}x. "
              f"Replies the same with the cache on and off: {'yes' if run['single_replies_identical'] else 'no (D)'}.", "",
              f"## B. {b['conversations']} conversations of {b['turns']} turns at once, two replicas", "",
              f"Prompt-token hit ratio from turn 2 on: {b['hit_ratio_from_turn_2']:.1%}. Conversations that found "
              f"their previous turn cached at every turn (served by one replica): "
              f"{b['conversations_on_their_replica']} of {b['conversations']}. Errors: {b['errors']}. "
              f"{b['seconds']} s in all.", "",
              f"## C. {c['conversations']} conversations of 3 turns, a {c['budget_mb']} MB KV budget", "",
              f"Replica resident memory {c['rss_mb_before']} MB before, {c['rss_mb_after']} MB after; the cache "
              f"holds {c['cache_mb_held']} MB after {c['evictions']} evictions; {c['errors']} of {c['turns']} "
              "turns failed.", "",
              "## D. Greedy replies with the cache on and off, in-process, one history", "",
              "| weights | identical replies | tokens before the first difference |", "| --- | ---: | ---: |",
              *(f"| {d['quantization']} | {d['identical_replies']} of {d['turns']} | "
                f"{d['tokens_before_first_difference']} of {d['tokens']} |" for d in run["agreement"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    args = parse_args(argv)
    agreed = agreement(args.turns, args.reply_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A Ray of its own (address="local"), whatever else runs here; 8 logical CPUs for 4 model replicas.
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        client = serve_api.serve_start(http_options={"host": "127.0.0.1", "port": port})
        apps = applications(args.budget_mb)
        client.deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))
        deadline = time.monotonic() + 600
        while not all(s.status == "RUNNING" for s in serve.status().applications.values()):
            if time.monotonic() > deadline or any(s.status == "DEPLOY_FAILED" for s in serve.status().applications.values()):
                raise SystemExit(f"The applications did not start: {serve.status().applications}")
            time.sleep(2)

        model = DeployConfig.read(ROOT / "deploy.yaml").textbot("textbot").default.served_name

        async def replica_stats(app: str) -> dict:
            return await serve.get_deployment_handle(deployment_name(model), app_name=app).stats.remote()

        run = asyncio.run(measure(f"http://127.0.0.1:{port}", args, replica_stats))
    finally:
        serve.shutdown()
        ray.shutdown()
    run |= {"agreement": agreed, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "bench.conversations", *(argv or sys.argv[1:])]),
            "settings": vars(args) | {"out": str(args.out)}}
    write_side_study(args.out, "conversations", run, report(run))


if __name__ == "__main__":
    main()
