"""`python -m bench`: stream greedy replies at several concurrencies through every
path (in-process engine, plain transformers, the HTTP routes, the chat page, and as the
peer llama.cpp's own `llama-server` on the same GGUF file, its slots decoded together by
continuous batching: `make bench` builds it, see bench/llamacpp_build.py) and write
docs/BENCHMARKS.md with the results.

The model is deploy.yaml's default (the textbot application's first model) unless --model
names another source; the in-process targets use it, the served targets whatever the stack
at --url serves. llama.cpp's runs on it too, and without --model on each of the application's
other models that is a GGUF file as well, side by side with `models` on the same file.

Result keys: a target's name (`engine`, `openai`, ...) for the benchmark's model; `<target>:<model>`
(model_key) for one of several models by its served name: `openai:gemma-3-270m` from `models`,
`llamacpp:gemma-3-270m` and `llamacpp-2t:gemma-3-270m` from llama-server on that model's file
(one key per thread count, llamacpp_runs). The benchmark's own model keeps `llamacpp` and
`llamacpp-<n>t`, as before several models. A model llama.cpp cannot run (not a GGUF file) is in
`skipped` under its `llamacpp:<model>` key, with the reason.

Several models (issue 30): `models` measures each of the application's models through the
OpenAI route by name (`model`), at each concurrency; `mixed` sends 8 streams at once over its
first two models, in turn; `wake` waits until each sleeping model (autoscaling min_replicas 0)
has no replica, then times one request to it from sending to its first token (the replica's
start), beside a request to it awake. `wake` runs first, before anything wakes the model.

The served targets use a running `make run` stack at --url; if none answers,
the benchmark starts one itself as `make run` does (`python -m backend.launch
deploy.yaml`, or --config) and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import report, stack
from bench.report import model_key
from bench.clients import completions_client, engine_client, openai_client, page_client, text_client, transformers_client
from bench.load import PROMPTS, run_level, run_mixed, run_one

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_YAML = ROOT / "deploy.yaml"
ALL_TARGETS = ["engine", "transformers", "http", "openai", "page", "llamacpp", "models", "mixed", "wake"]
SERVED = {"http", "openai", "page", "models", "mixed", "wake"}
MIXED_STREAMS = 8  # the mixed run's streams, over two models
# A model whose replica just stopped may start again by itself: Serve's autoscaler averages a model's
# requests over look_back_period_s (30 s by default), so one stopped sooner than that after its last
# request is started again (seen with downscale_delay_s 15). Such a model must have had no running
# replica for this long on end (the look-back, then a start's time) before it is timed waking.
WAKE_QUIET_S = 60
WAKE_POLL_S = (2, 0.5)  # GET /v1/models while waiting for a model to sleep, and while it wakes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated, from: %(default)s")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply (default %(default)s)")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the served stack (default %(default)s)")
    parser.add_argument("--api-path", help="Textbot application's route prefix (default: its route_prefix in "
                                           "--config, /api in deploy.yaml)")
    parser.add_argument("--page-path", default="/", help="chat page's route prefix")
    parser.add_argument("--model", help="model source for the in-process and llama.cpp targets (default: deploy.yaml's)")
    parser.add_argument("--config", type=Path, default=DEPLOY_YAML,
                        help="the Serve config whose models are measured, and served when no stack answers "
                             "(default: deploy.yaml)")
    parser.add_argument("--app", default="textbot", help="its models application (default %(default)s)")
    parser.add_argument("--no-start", action="store_true", help="never start a stack; skip served targets instead")
    parser.add_argument("--llamacpp-threads", type=int, nargs="+",
                        help="llama-server threads (-t and -tb), one server and one set of rows each (default: the "
                             "Textbot model replica's CPUs in deploy.yaml, then every core)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where BENCHMARKS.md goes")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(args.targets) - set(ALL_TARGETS):
        parser.error(f"unknown targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.requests_per_client < 1:
        parser.error("--concurrency, --max-tokens and --requests-per-client must be at least 1")
    if args.llamacpp_threads and min(args.llamacpp_threads) < 1:
        parser.error("--llamacpp-threads must be at least 1")
    args.config = args.config.resolve()  # the stack it may start runs in the checkout
    if args.api_path is None:
        from backend.config import DeployConfig

        try:
            args.api_path = DeployConfig.read(args.config).app(args.app).get("route_prefix") or "/"
        except (KeyError, OSError) as error:
            parser.error(f"--config/--app: {error}")
    return args


def deployed(config: Path | str = DEPLOY_YAML, app: str = "textbot"):
    """The models application `app` of a Serve config (deploy.yaml's `textbot`), validated as Serve
    validates it: its models (`.models`, the default first: `.default`), their engines and deployments."""
    from backend.config import DeployConfig

    return DeployConfig.read(config).textbot(app)


def torch_threads(model) -> int:
    """The torch threads of a replica of `model` (a ServedModel): its torch_threads, else as many as
    its replica's CPUs (its deployment's ray_actor_options.num_cpus), at least one."""
    return model.torch_threads or max(1, round(model.deployment.ray_actor_options.get("num_cpus", 1)))


def served_urls(args: argparse.Namespace) -> tuple[str, str]:
    """The Textbot API's and the chat page's base URLs."""
    return args.url.rstrip("/") + args.api_path.rstrip("/"), args.url.rstrip("/") + "/" + args.page_path.strip("/")


@contextlib.contextmanager
def served_stack(args: argparse.Namespace, skipped: dict):
    """Use the stack at --url, or serve deploy.yaml as `make run` does (bench/stack.py) for the
    length of the benchmark."""
    api, page = served_urls(args)
    if (up := stack.healthy(api)) or args.no_start:
        yield up
        return
    print("No stack answers at", api, f"- starting `python -m backend.launch {args.config.name}`, as `make run` does",
          flush=True)
    with stack.launched_stack(args.url, api, page, args.config) as launched:
        if launched.why:
            for target in SERVED:
                skipped[target] = launched.why
        yield launched.why is None


LLAMACPP_MISSING = ("llama.cpp's llama-server is not built: `make bench` builds it (python -m bench.llamacpp_build: "
                    "for this CPU, from llama-cpp-python's sdist, about 6 minutes on 2 cores, once)")


def llamacpp_runs(requested: list[int] | None, textbot_threads: int) -> dict[str, int]:
    """Run name -> llama.cpp threads. By default `llamacpp` has the torch threads of a
    Textbot model replica (its CPUs in deploy.yaml), like for like; `llamacpp-<n>t` then has
    every core. The first of --llamacpp-threads otherwise. Every model gets the same runs, so
    its rows line up with the others'."""
    threads = requested or [textbot_threads, os.cpu_count() or 1]
    return {("llamacpp" if n == threads[0] else f"llamacpp-{n}t"): n for n in dict.fromkeys(threads)}


def llamacpp_context(slots: int, max_tokens: int) -> int:
    """llama-server's -c: the KV cache it splits evenly among its slots. Each slot needs room
    for a prompt (the bench's are under 64 tokens with a chat template) and its reply; 2048
    tokens a slot (16384 for 8) unless the replies are longer."""
    per_slot = 2048
    while per_slot < max_tokens + 512:
        per_slot *= 2
    return slots * per_slot


def llamacpp_flags(threads: int | str, slots: int, context: int) -> list[str]:
    """llama-server's flags but the model and port (the report names them): -t and -tb both
    (decode and prompt threads; -tb defaults to -t, named so nothing else decides it), -np
    slots decoded together by continuous batching, as many as a Textbot replica's
    engine.max_running, -c their KV cache, and no web UI."""
    return ["-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(context), "--no-webui"]


def llamacpp_command(server: Path, gguf: Path, port: int, threads: int, slots: int, context: int) -> list[str]:
    return [str(server), "-m", str(gguf), *llamacpp_flags(threads, slots, context),
            "--host", "127.0.0.1", "--port", str(port)]


def llamacpp_binary() -> Path | None:
    """llama-server as bench.llamacpp_build built it for this CPU, else one on PATH."""
    from bench import llamacpp_build

    found = llamacpp_build.binary("llama-server") or shutil.which("llama-server")
    return Path(found) if found else None


def gguf_path(model_settings) -> Path | None:
    """The GGUF file Textbot loads for these settings (a `package:pkg/file.gguf` source is
    found inside its installed package), or None for a model that is not one GGUF file."""
    from backend.engine.location import locate

    location = locate(model_settings)
    return Path(location.path, location.gguf_file) if location.gguf_file else None


@contextlib.contextmanager
def llamacpp_server(command_for):
    """llama.cpp's llama-server on the same GGUF file, on a free port: `command_for(port)`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command_for(port), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    # 503 while the model loads, 200 once the slots are ready.
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(1)
            else:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
                state = "did not answer within 120 s" if process.poll() is None else f"exited ({process.returncode})"
                raise RuntimeError(f"llama-server {state}: {' / '.join(tail)}")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def llamacpp_stream(url: str, client: httpx.AsyncClient, tokenizer):
    """How the bench talks to llama-server: a chat model through /v1/chat/completions with the
    client of Textbot's OpenAI route (llama-server applies the GGUF's own chat template). A
    model without a chat template (a base model) through /v1/completions instead, its prompt
    as the token ids Textbot's chat route builds for it (backend/engine/prompt.encode_chat:
    each turn's text, then EOS): llama-server would otherwise pick a chat template of its own
    for it (ChatML), which the model never saw, and Textbot would not use."""
    if tokenizer.chat_template:
        return openai_client(url, client), "/v1/chat/completions"
    from backend.engine.prompt import encode_chat
    from backend.protocol import ChatMessage

    encode = lambda prompt: encode_chat(tokenizer, [ChatMessage(role="user", content=prompt)])  # noqa: E731
    return completions_client(url, client, encode), "/v1/completions"


def model_runs(runs: dict[str, int], name: str | None) -> dict[str, int]:
    """One model's llama-server runs by result key: the run names themselves for the benchmark's
    own model (`name` None), as before several models; model_key(run, name) for any other."""
    return {(model_key(run, name) if name else run): threads for run, threads in runs.items()}


async def measure_llamacpp_models(args, models, textbot_threads: int, tokenizer, results: dict,
                                  skipped: dict) -> dict:
    """`llamacpp`: llama-server on each model's GGUF file (measure_llamacpp), the first model (the
    benchmark's, whose tokenizer is `tokenizer`) under the run names themselves, each other one
    under model_key(run, its name). What the report says of them: the runs' threads, the binary
    and its version (shared), and per model its file and flags."""
    from bench import llamacpp_build

    runs = llamacpp_runs(args.llamacpp_threads, textbot_threads)
    server = llamacpp_binary()
    if server is None:
        skipped["llamacpp"] = LLAMACPP_MISSING
        return {"threads": runs}
    measured = {}
    for index, model in enumerate(models):
        own = index == 0
        if peer := await measure_llamacpp(args, model, server, model_runs(runs, None if own else model.served_name),
                                          tokenizer if own else None, results, skipped):
            measured[model.served_name] = peer
    return {"threads": runs, "binary": str(server), "version": llamacpp_build.version_line(server),
            "models": measured}


async def measure_llamacpp(args, model, server: Path, runs: dict[str, int], tokenizer, results: dict,
                           skipped: dict) -> dict | None:
    """One model's llama-server runs on its GGUF file, one per thread count (`runs`: result key ->
    threads), with as many slots as its replica's engine.max_running; its tokenizer (loaded when
    `tokenizer` is None) counts the tokens. What the report says of them, or None, the reason in
    `skipped`, for a model that is not one GGUF file."""
    model_settings = model.model_settings()
    gguf = gguf_path(model_settings)
    if gguf is None:  # under its first run's key: the reason holds for all of them
        skipped[next(iter(runs))] = f"the model ({model.source}) is not a GGUF file, which llama.cpp needs"
        return None
    if tokenizer is None:
        tokenizer = load_tokenizer(model_settings)
    count_tokens = token_counter(tokenizer)
    slots = model.engine.max_running
    context = llamacpp_context(slots, args.max_tokens)
    peer = {"source": model.source, "gguf": str(gguf), "slots": slots, "context": context,
            "flags": llamacpp_flags("N", slots, context), "results": list(runs)}
    for key, threads in runs.items():
        try:
            with llamacpp_server(lambda port: llamacpp_command(server, gguf, port, threads, slots, context)) as url:
                # A new connection per request: llama-server closed kept-alive connections now and then,
                # and the request sent on one failed ("Server disconnected without sending a response";
                # one stream's whole measurement, in two runs of four).
                async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(
                        max_connections=64, max_keepalive_connections=0)) as client:
                    stream, peer["endpoint"] = llamacpp_stream(url, client, tokenizer)
                    results[key] = await measure(key, stream, args, count_tokens)
        except RuntimeError as error:
            skipped[key] = str(error)
    return peer


async def measure(name: str, stream, args, count_tokens) -> list[dict]:
    levels = []
    # Warm-up, not reported (the page's reply-length control starts at 16 tokens: fewer is refused).
    await run_level(stream, 1, 1, 16 if name == "page" else min(args.max_tokens, 8),
                    count_tokens)
    for concurrency in args.concurrency:
        level = await run_level(stream, concurrency, args.requests_per_client, args.max_tokens, count_tokens)
        print(f"{name:>12} x{concurrency:<3} ttft p50 {level['ttft_p50_ms']} ms, itl p95 {level['itl_p95_ms']} ms, "
              f"per-stream {level['per_stream_tok_s']} tok/s, aggregate {level['aggregate_tok_s']} tok/s, "
              f"errors {level['errors']}", flush=True)
        levels.append(level)
    return levels


def may_sleep(model) -> bool:
    """Whether Serve may scale a model (a ServedModel) to no replica (min_replicas 0), even one that
    starts with a replica: unlike ServedModel.sleeps (no replica from the start), what `wake` times."""
    return (model.deployment.autoscaling_config or {}).get("min_replicas", 1) == 0


async def loaded_models(client: httpx.AsyncClient, api: str) -> dict[str, bool]:
    """GET /v1/models: each model's name -> whether a replica of it runs (asking wakes none)."""
    response = await client.get(f"{api}/v1/models", timeout=30)
    response.raise_for_status()
    return {card["id"]: bool(card.get("loaded")) for card in response.json()["data"]}


async def wait_asleep(client: httpx.AsyncClient, api: str, name: str, within_s: float) -> float:
    """Wait until `name` has no running replica: at once if it has none at the first look, else
    once it has had none for WAKE_QUIET_S on end. The seconds waited; TimeoutError past `within_s`."""
    started, had_one, asleep_since = time.monotonic(), False, None
    while True:
        now = time.monotonic()
        if now - started > within_s:
            raise TimeoutError(f"{name} did not stay without a replica within {within_s:.0f} s")
        if (await loaded_models(client, api)).get(name, True):
            if not had_one:
                print(f"{'wake':>12} {name} has a replica: waiting until Serve stops it and it stays stopped "
                      f"for {WAKE_QUIET_S} s (up to {within_s:.0f} s)", flush=True)
            had_one, asleep_since = True, None
        elif not had_one:
            return 0.0
        elif asleep_since is None:
            asleep_since = now
        elif now - asleep_since >= WAKE_QUIET_S:
            return round(now - started, 1)
        await asyncio.sleep(WAKE_POLL_S[0])


def caches(model) -> dict:
    """Whether a model's converted copy and compiled step were on disk (it starts from them)."""
    from backend.engine.compiled import package_path
    from backend.engine.location import converted_cache, locate

    settings = model.model_settings()
    try:
        folder = converted_cache(settings, locate(settings))
    except Exception:  # noqa: BLE001 - a source this machine cannot find: unknown
        folder = None
    if folder is None:
        return {"converted": None, "compiled": None}
    from backend.engine import loading  # torch: only for a model converted here

    return {"converted": (folder / loading._COMPLETE).is_file(),
            "compiled": package_path(folder).is_file() if settings.compile else None}


async def measure_wake(api: str, client: httpx.AsyncClient, model, count_tokens, max_tokens: int) -> dict:
    """A sleeping model woken by one request (the OpenAI route, by name): wait until it has no
    replica, then time that request from sending to its first token, polling /v1/models meanwhile
    for when its replica runs; then a second request, the model awake, for comparison. The first
    token from zero less the awake one is the replica's start, as a client waits for it."""
    name = model.served_name
    within = (model.deployment.autoscaling_config or {}).get("downscale_delay_s", 600) + WAKE_QUIET_S + 120
    record = {"model": name, "caches": caches(model), "asleep_wait_s": await wait_asleep(client, api, name, within),
              "load_average": os.getloadavg()[0]}  # this machine is shared: how busy it was
    stream = openai_client(api, client, model=name)
    started, running_at = time.perf_counter(), None

    async def watch() -> None:
        nonlocal running_at
        while not (await loaded_models(client, api)).get(name):
            await asyncio.sleep(WAKE_POLL_S[1])
        running_at = time.perf_counter()

    watcher = asyncio.create_task(watch())
    woken = await run_one(stream, PROMPTS[0], max_tokens)
    # At once: an engine idle for a second builds its grammar's vocabulary, holding its GIL (Gemma's
    # 262144 tokens took 3.75 s here), which a request sent then would wait for.
    awake = await run_one(stream, PROMPTS[0], max_tokens)
    with contextlib.suppress(asyncio.TimeoutError, httpx.HTTPError):
        await asyncio.wait_for(watcher, 10)
    watcher.cancel()
    for request in (woken, awake):
        request.tokens = count_tokens(request.text)
    ttft = lambda r: round((r.arrivals[0] - r.started) * 1000, 1) if r.arrivals and not r.error else None  # noqa: E731
    record |= {"ttft_ms": ttft(woken), "awake_ttft_ms": ttft(awake), "tokens": woken.tokens,
               "total_ms": round(((woken.arrivals or [started])[-1] - started) * 1000, 1),
               "running_seen_ms": round((running_at - started) * 1000, 1) if running_at else None,
               "errors": [r.error for r in (woken, awake) if r.error]}
    if record["ttft_ms"] is not None and record["awake_ttft_ms"] is not None:
        record["replica_start_ms"] = round(record["ttft_ms"] - record["awake_ttft_ms"], 1)
    print(f"{'wake':>12} {name}: asleep after {record['asleep_wait_s']} s of waiting; first token "
          f"{record['ttft_ms']} ms from zero, {record['awake_ttft_ms']} ms awake; replica running seen at "
          f"{record['running_seen_ms']} ms; errors {record['errors'] or 0}", flush=True)
    return record


def token_counter(tokenizer):
    """A function counting the tokens of a text with `tokenizer`, as every target's replies are counted."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def token_counters(models) -> dict:
    """Model name -> a function counting the tokens of a text with that model's tokenizer."""
    return {model.served_name: token_counter(load_tokenizer(model.model_settings())) for model in models}


async def measure_wakes(api: str, client: httpx.AsyncClient, models, counters: dict, max_tokens: int,
                        skipped: dict) -> list[dict]:
    """`wake`: each sleeping model woken from no replica (measure_wake)."""
    asleep = [model for model in models if may_sleep(model)]
    if not asleep:
        skipped["wake"] = "no model of the application sleeps (autoscaling_config.min_replicas 0)"
    woken = []
    for model in asleep:
        try:
            woken.append(await measure_wake(api, client, model, counters[model.served_name], max_tokens))
        except (TimeoutError, httpx.HTTPError) as error:
            skipped["wake"] = f"{model.served_name}: {error}"
    return woken


async def measure_mixed(api: str, client: httpx.AsyncClient, models, counters: dict, max_tokens: int,
                        skipped: dict) -> dict | None:
    """`mixed`: MIXED_STREAMS streams at once over the application's first two models, in turn."""
    if len(models) < 2:
        skipped["mixed"] = "the application serves one model"
        return None
    streams = {model.served_name: openai_client(api, client, model=model.served_name) for model in models[:2]}
    for stream in streams.values():  # each model awake before the clock starts
        await run_one(stream, "Hi", 4)
    mixed = await run_mixed(streams, counters, MIXED_STREAMS, max_tokens)
    print(f"{'mixed':>12} x{MIXED_STREAMS:<3} aggregate {mixed['all']['aggregate_tok_s']} tok/s, " + ", ".join(
        f"{name} ttft p50 {level['ttft_p50_ms']} ms" for name, level in mixed["models"].items())
        + f", errors {mixed['all']['errors']}", flush=True)
    return mixed


def load_tokenizer(model_settings):
    """The model's tokenizer without its weights: from the converted copy Textbot keeps of a
    GGUF model when there is one (quick), else from the source."""
    from transformers import AutoTokenizer

    from backend.engine import loading
    from backend.engine.location import converted_cache, locate

    location = locate(model_settings)
    cache = converted_cache(model_settings, location)
    if cache and (cache / loading._COMPLETE).is_file():
        return loading._load_tokenizer(cache)
    return AutoTokenizer.from_pretrained(location.path, **({"gguf_file": location.gguf_file}
                                                           if location.gguf_file else {}))


async def run(args: argparse.Namespace) -> dict:
    from backend.engine import loading as model
    from backend.engine import Engine
    from backend.settings import TextbotSettings

    load_at_start = os.getloadavg()
    deployment = deployed(args.config, args.app)
    settings = TextbotSettings.model_validate({"model": {"source": args.model}}) if args.model else deployment
    served_model = settings.default
    # A replica's torch threads: the model's own setting, else deploy.yaml's default model replica's CPUs.
    threads = served_model.torch_threads or torch_threads(deployment.default)
    # The model itself only for the in-process targets; the others need its tokenizer alone.
    loaded = model.load(served_model.model_settings()) if {"engine", "transformers"} & set(args.targets) else None
    tokenizer = loaded.tokenizer if loaded else load_tokenizer(served_model.model_settings())
    count_tokens = token_counter(tokenizer)
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}

    if "engine" in args.targets:
        limits = served_model.engine.model_copy(
            update={"max_waiting": max(served_model.engine.max_waiting, max(args.concurrency))})
        engine = Engine(loaded, limits, threads)
        results["engine"] = await measure("engine", engine_client(engine), args, count_tokens)
        engine.shutdown()
    if "transformers" in args.targets:
        # The tutorial's way needs transformers' own model object (its `generate`), not the engine's.
        hugging_face = model.load(served_model.model_settings(), transformers_model=True)
        results["transformers"] = await measure("transformers", transformers_client(hugging_face), args, count_tokens)

    served = [t for t in args.targets if t in SERVED]
    several = {}
    if served:
        with served_stack(args, skipped) as up:
            api, page = served_urls(args)
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
                clients = {"http": lambda: text_client(api, client), "openai": lambda: openai_client(api, client),
                           "page": lambda: page_client(page.rstrip("/") + "/", client, served_model.name)}
                if not up:
                    for target in served:
                        skipped.setdefault(target, f"no stack answered at {api}")
                    served = []
                models = deployment.models
                counters = token_counters(models) if {"models", "mixed", "wake"} & set(served) else {}
                if "wake" in served:  # first: anything else may wake the sleeping model
                    several["wake"] = await measure_wakes(api, client, models, counters, args.max_tokens, skipped)
                for target in served:
                    if target in clients:
                        results[target] = await measure(target, clients[target](), args, count_tokens)
                if "models" in served:  # each model by name, through the OpenAI route
                    for name in (entry.served_name for entry in models):
                        key = model_key("openai", name)
                        results[key] = await measure(key, openai_client(api, client, model=name), args, counters[name])
                if "mixed" in served and (mixed := await measure_mixed(api, client, models, counters,
                                                                       args.max_tokens, skipped)):
                    several["mixed"] = mixed
    peer = {}
    if "llamacpp" in args.targets:
        # settings.models: the --model alone, else the application's, its default (served_model) first.
        peer = await measure_llamacpp_models(args, settings.models, threads, tokenizer, results, skipped)

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": report.machine(),
        "load_average": {"start": [round(x, 1) for x in load_at_start], "end": [round(x, 1) for x in os.getloadavg()]},
        "settings": {"command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]), "model": served_model.source,
                     "quantization": served_model.quantization,
                     "dtype": served_model.dtype, "max_tokens": args.max_tokens,
                     "requests_per_client": args.requests_per_client, "concurrency": args.concurrency,
                     "textbot_threads": threads,
                     "llamacpp_threads": peer.pop("threads", {}), "llamacpp_server": peer,
                     "config": str(args.config), "app": args.app,
                     "models": [m.served_name for m in deployment.models]},
        "results": results,
        "skipped": skipped,
    } | several


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outcome = asyncio.run(run(args))
    data, figure = args.out / "benchmarks" / "results.json", args.out / "benchmarks" / "throughput.png"
    report.write_json(data, outcome)
    drawn = report.write_plot(figure, outcome)
    markdown = args.out / "BENCHMARKS.md"
    report.write_markdown(markdown, outcome, figure.relative_to(args.out).as_posix() if drawn else None,
                          data.relative_to(args.out).as_posix())
    for name, measured, met in report.targets(outcome):
        print(f"{'MET ' if met else 'MISS'} {name}: {measured}")
    print(f"Wrote {markdown}{f', {figure}' if drawn else ''} and {data}")


if __name__ == "__main__":
    main()
