"""The served stack a benchmark measures: the one already answering at its URL, or deploy.yaml
served for the length of the benchmark as `make run` does (`python -m backend.launch`), on
ports of its own beside any other stack on the machine, and stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300
# Once idle for 1 s after it starts, the engine builds the grammar's vocabulary, holding its
# GIL for up to 1.5 s (measured): the first measured requests must not meet that.
SETTLE_S = 3.0


def healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settle(api_url: str, page_url: str, deadline: float) -> None:
    """A stack just started is healthy before it has settled: the chat page's replica may
    still be starting (importing Gradio takes seconds of CPU) and the engine has yet to
    build the grammar's vocabulary. Wait for the page, send one reply, give the engine time."""
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(page_url.rstrip("/") + "/config", timeout=5).status_code == 200:
                break
        time.sleep(1)
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{api_url}/", params={"prompt": "Hi", "max_new_tokens": 4}, timeout=60).read()
    time.sleep(SETTLE_S)


@dataclass
class LaunchedStack:
    """A stack this process started: the launcher's process (the root of the stack's process
    tree), its ports, and why it is not serving when it is not (`why`, None once healthy)."""

    process: subprocess.Popen
    http_port: int | None
    metrics_port: int
    ray_port: int
    why: str | None = None


def launch_command(http_port: int | None, metrics_port: int, ray_port: int,
                   config: Path = ROOT / "deploy.yaml") -> list[str]:
    return [sys.executable, "-m", "backend.launch", *([f"--http-port={http_port}"] if http_port else []),
            f"--metrics-port={metrics_port}", f"--ray-port={ray_port}", str(config)]


@contextlib.contextmanager
def launched_stack(url: str, api_url: str, page_url: str, config: Path = ROOT / "deploy.yaml"):
    """deploy.yaml (or `config`) served as `make run` serves it (backend/launch.py: the engine on a CPU of its
    own), HTTP on `url`'s port; the metrics exporter and the GCS on free ports, so that a
    `make run` or another engineer's stack holding the defaults (8080, 6379) does not stop it.
    Yields a LaunchedStack, healthy and settled unless its `why` says otherwise; stopped on leaving."""
    stack = LaunchedStack(None, urllib.parse.urlsplit(url).port, free_port(), free_port())
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # SIGINT back to its default in the child: a shell's background job (`python -m bench &` in a
    # script) starts with SIGINT ignored; the launcher stops its Ray node on the SIGINT below.
    stack.process = subprocess.Popen(launch_command(stack.http_port, stack.metrics_port, stack.ray_port, config),
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(api_url) and stack.process.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
        if not healthy(api_url):
            stack.why = (f"the stack exited (code {stack.process.returncode}; `make run` shows why: its ports taken?)"
                         if stack.process.poll() is not None
                         else f"the stack did not become healthy within {START_TIMEOUT_S} s")
        else:
            settle(api_url, page_url, deadline)
        yield stack
    finally:
        stop(stack.process)


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)  # the launcher stops its Ray node on SIGINT
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(60)
