"""`python -m bench`: stream greedy replies at several concurrencies through every
path (in-process engine, plain transformers, the HTTP routes, the chat page,
llama.cpp when installed) and write docs/BENCHMARKS.md with the results.

The served targets use a running `make run` stack at --url; if none answers,
the benchmark starts `serve run deploy.yaml` itself and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from bench import report
from bench.clients import engine_client, gradio_client, openai_client, text_client, transformers_client
from bench.load import run_level

ROOT = Path(__file__).resolve().parent.parent
ALL_TARGETS = ["engine", "transformers", "http", "openai", "page", "llamacpp"]
SERVED = {"http", "openai", "page"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated, from: %(default)s")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply (default %(default)s)")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the served stack (default %(default)s)")
    parser.add_argument("--api-path", default="/api", help="Textbot application's route prefix")
    parser.add_argument("--page-path", default="/", help="chat page's route prefix")
    parser.add_argument("--model", help="model source for the in-process targets (default: deploy.yaml's)")
    parser.add_argument("--no-start", action="store_true", help="never start a stack; skip served targets instead")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where BENCHMARKS.md goes")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(args.targets) - set(ALL_TARGETS):
        parser.error(f"unknown targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.requests_per_client < 1:
        parser.error("--concurrency, --max-tokens and --requests-per-client must be at least 1")
    return args


def textbot_args() -> tuple[dict, int]:
    """deploy.yaml's Textbot settings and the model replica's CPUs (its torch threads)."""
    config = yaml.safe_load((ROOT / "deploy.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == "textbot")
    cpus = next(d for d in app["deployments"] if d["name"] == "Textbot")["ray_actor_options"]["num_cpus"]
    return app["args"], int(cpus)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def served_stack(args: argparse.Namespace, skipped: dict):
    """Use the stack at --url, or run `serve run deploy.yaml` for the length of the benchmark."""
    api = args.url.rstrip("/") + args.api_path.rstrip("/")
    if (up := healthy(api)) or args.no_start:
        yield up
        return
    print("No stack answers at", api, "- starting `serve run deploy.yaml`", flush=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    serve = Path(sys.executable).with_name("serve")
    process = subprocess.Popen([str(serve), "run", str(ROOT / "deploy.yaml")], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not healthy(api) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
        if not (up := healthy(api)):
            for target in SERVED:
                skipped[target] = "the stack did not become healthy within 300 s"
        yield up
    finally:
        os.killpg(process.pid, signal.SIGINT)  # serve run stops Ray on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)


@contextlib.contextmanager
def llamacpp_server(model_args: dict):
    """llama-cpp-python's OpenAI server on the same GGUF file, on a free port."""
    from backend.engine import loading as model_files
    from backend.settings import ModelSettings

    location = model_files.locate(ModelSettings.model_validate(model_args))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(Path(location.path, location.gguf_file)),
               "--port", str(port), "--n_threads", str(os.cpu_count())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield url.removesuffix("/v1")
    finally:
        process.terminate()
        process.wait(30)


async def measure(name: str, stream, args, count_tokens) -> list[dict]:
    levels = []
    await run_level(stream, 1, 1, min(args.max_tokens, 8), count_tokens)  # warm-up, not reported
    for concurrency in args.concurrency:
        level = await run_level(stream, concurrency, args.requests_per_client, args.max_tokens, count_tokens)
        print(f"{name:>12} x{concurrency:<3} ttft p50 {level['ttft_p50_ms']} ms, itl p95 {level['itl_p95_ms']} ms, "
              f"per-stream {level['per_stream_tok_s']} tok/s, aggregate {level['aggregate_tok_s']} tok/s, "
              f"errors {level['errors']}", flush=True)
        levels.append(level)
    return levels


async def run(args: argparse.Namespace) -> dict:
    from backend.engine import loading as model
    from backend.engine import Engine
    from backend.settings import TextbotSettings

    model_args, threads = textbot_args()
    if args.model:
        model_args = {"model": {"source": args.model}}
    settings = TextbotSettings.model_validate(model_args)
    loaded = model.load(settings.model)
    count_tokens = lambda text: len(loaded.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}

    if "engine" in args.targets:
        limits = settings.engine.model_copy(update={"max_waiting": max(settings.engine.max_waiting, max(args.concurrency))})
        engine = Engine(loaded, limits, settings.model.torch_threads or threads)
        results["engine"] = await measure("engine", engine_client(engine), args, count_tokens)
        engine.shutdown()
    if "transformers" in args.targets:
        results["transformers"] = await measure("transformers", transformers_client(loaded), args, count_tokens)

    served = [t for t in args.targets if t in SERVED]
    if served:
        with served_stack(args, skipped) as up:
            api = args.url.rstrip("/") + args.api_path.rstrip("/")
            page = args.url.rstrip("/") + "/" + args.page_path.strip("/")
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
                clients = {"http": lambda: text_client(api, client), "openai": lambda: openai_client(api, client),
                           "page": lambda: gradio_client(page.rstrip("/") + "/")}
                for target in served:
                    if up:
                        results[target] = await measure(target, clients[target](), args, count_tokens)
                    else:
                        skipped.setdefault(target, f"no stack answered at {api}")
    if "llamacpp" in args.targets:
        if importlib.util.find_spec("llama_cpp") is None:
            skipped["llamacpp"] = "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
        else:
            with llamacpp_server(settings.model.model_dump()) as url:
                async with httpx.AsyncClient(timeout=600) as client:
                    results["llamacpp"] = await measure("llamacpp", openai_client(url, client), args, count_tokens)

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": report.machine(),
        "settings": {"command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]), "model": settings.model.source,
                     "dtype": settings.model.dtype, "max_tokens": args.max_tokens,
                     "requests_per_client": args.requests_per_client, "concurrency": args.concurrency},
        "results": results,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outcome = asyncio.run(run(args))
    data, figure = args.out / "benchmarks" / "results.json", args.out / "benchmarks" / "throughput.png"
    report.write_json(data, outcome)
    report.write_plot(figure, outcome)
    markdown = args.out / "BENCHMARKS.md"
    report.write_markdown(markdown, outcome, figure.relative_to(args.out).as_posix(),
                          data.relative_to(args.out).as_posix())
    for name, measured, met in report.targets(outcome):
        print(f"{'MET ' if met else 'MISS'} {name}: {measured}")
    print(f"Wrote {markdown}, {figure} and {data}")


if __name__ == "__main__":
    main()
