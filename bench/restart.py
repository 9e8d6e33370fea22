"""Restart to the first streamed token: `python -m bench.restart [--rounds 3] [--before DIR]`.

What `make run` does with its caches warm (set up, the model's converted copy on disk):
`python -m backend.launch deploy.yaml` in a checkout, timed from its start to the first
byte of `POST /api/?prompt=Hi&max_new_tokens=4`, polled every 50 ms; then Ctrl-C, as a
person stops it. The launcher's log dates the phases in between (Ray's node, Serve, the
application's build, the engine's load). `--before DIR`: another checkout (a git worktree
of an earlier commit) measured in alternate rounds with this one, so both see the same
machine. Needs the ports of `make run` free. Writes docs/benchmarks/restart.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import write_side_study

ROOT = Path(__file__).resolve().parent.parent
FIRST_TOKEN_TIMEOUT_S = 180
# Log lines that end each phase, in order, as the launcher prints them.
# The warm engine (backend/engine/process.py) loads while Serve starts: its load may end before
# the application is built; its replica adopts it after.
PHASES = [("Ray's node", "Connected to Ray cluster."),
          ("Serve's controller and proxy", 'Started Serve in namespace "serve"'),
          ("building the application", "Imported and built app 'textbot' successfully"),
          ("the engine's load", "backend.engine.loading -- Loaded "),
          ("the model replica adopts the engine", "A model replica adopted this warm engine"),
          ]
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout to measure alternately (e.g. a worktree)")
    parser.add_argument("--port", type=int, default=8000, help="deploy.yaml's HTTP port")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.before and not (args.before / "backend" / "launch.py").is_file():
        parser.error(f"{args.before} is not a Textbot checkout")
    return args


def first_byte(port: int, started: float, launcher: subprocess.Popen) -> float:
    deadline = started + FIRST_TOKEN_TIMEOUT_S
    while time.time() < deadline and launcher.poll() is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/api/?prompt=Hi&max_new_tokens=4")
            response = connection.getresponse()
            if response.status == 200 and response.read(1):
                return time.time() - started
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    raise RuntimeError(f"no first token within {FIRST_TOKEN_TIMEOUT_S} s (launcher exit code {launcher.poll()})")


def phases(log: str, started: float) -> dict[str, float]:
    """Seconds from the launch to the first line of each phase's end, as the log dates it."""
    ends = {}
    for name, marker in PHASES:
        line = next((line for line in log.splitlines() if marker in line and _STAMP.search(line)), None)
        if line:
            stamp, millis = _STAMP.search(line).groups()
            at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000
            ends[name] = round(at - started, 2)
    return ends


def restart(checkout: Path, port: int) -> dict:
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        started = time.time()
        launcher = subprocess.Popen([sys.executable, "-m", "backend.launch", "deploy.yaml"], cwd=checkout,
                                    env=os.environ | {"PYTHONPATH": str(checkout)}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seconds = first_byte(port, started, launcher)
        finally:
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
        log.seek(0)
        text = log.read()
    ttft = re.search(r'"time_to_first_token_ms": ([0-9.]+)', text)
    return {"first_byte_s": round(seconds, 2), "phase_ends_s": phases(text, started),
            "replica_ttft_ms": float(ttft.group(1)) if ttft else None}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkouts = {"this": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for round_number in range(args.rounds):
        for name, checkout in checkouts.items():
            runs[name].append(restart(checkout, args.port))
            print(f"round {round_number + 1} {name}: {runs[name][-1]}", flush=True)
            time.sleep(5)  # the node's processes finish exiting
    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "checkouts": {name: _commit(path) for name, path in checkouts.items()}, "runs": runs}
    write_side_study(args.out, "restart", run, markdown(run))
    return run


def _commit(checkout: Path) -> str:
    """The checkout's commit, and whether its tree has changes beyond it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or str(checkout)
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def markdown(run: dict) -> str:
    lines = [f"# Restart to the first token ({run['date']})", "",
             "`python -m bench.restart`: `python -m backend.launch deploy.yaml`, caches warm, to the first byte "
             "of `POST /api/?prompt=Hi&max_new_tokens=4`; phases from the launcher's log (seconds from the launch "
             "to the line that ends each).", "",
             "| checkout | first byte s (each round) | median | " + " | ".join(name for name, _ in PHASES)
             + " | first token in the replica ms |",
             "| --- | --- | ---: |" + " ---: |" * len(PHASES) + " ---: |"]
    for name, rounds in run["runs"].items():
        # A phase an older checkout does not log (the warm engine's adoption) shows as -.
        medians = [statistics.median(ends) if (ends := [r["phase_ends_s"][phase] for r in rounds
                                                         if phase in r["phase_ends_s"]]) else None
                   for phase, _ in PHASES]
        ttfts = [r["replica_ttft_ms"] for r in rounds if r["replica_ttft_ms"] is not None]
        lines.append(f"| {name} ({run['checkouts'][name]}) | {', '.join(str(r['first_byte_s']) for r in rounds)} | "
                     f"{statistics.median(r['first_byte_s'] for r in rounds):.2f} | "
                     + " | ".join("-" if m is None else f"{m:.2f}" for m in medians)
                     + f" | {f'{statistics.median(ttfts):.0f}' if ttfts else '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
