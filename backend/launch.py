"""`make run`: a Ray head node of our own, with its Prometheus exporter on
--metrics-port, deploy.yaml served onto it by `serve run`, and that node, and only
that node, stopped when serving ends (Ctrl-C, or SIGTERM from a process manager).

Why not `serve run` alone: the Ray it starts cannot be asked for a metrics port.
Why not `ray start --head` ... `ray stop`: `ray stop` stops every Ray node on the
machine, someone else's test session included.

    python -m backend.launch [--metrics-port 8080] [--ray-port 6379] [ray start flags] deploy.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to `ray start`, e.g. --temp-dir=/tmp/mine.")
    parser.add_argument("config", help="the Serve config file to serve, e.g. deploy.yaml")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus exporter (default 8080)")
    parser.add_argument("--ray-port", type=int, default=6379, help="the head node's GCS port (default 6379)")
    args, ray_flags = parser.parse_known_args()
    if not Path(args.config).is_file():
        parser.error(f"no Serve config at {args.config}")

    if "RAY_AUTH_MODE" not in os.environ:
        # Ray 2.60's head turns token auth on when it finds a token (~/.ray/auth_token), but a
        # client given an explicit address, like `serve run` below, only when RAY_AUTH_MODE says
        # so. Say it once, for both; with a token made if there is none, as ray.init() does.
        subprocess.run([BIN / "ray", "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL)
        os.environ["RAY_AUTH_MODE"] = "token"
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", "--disable-usage-stats",
                             f"--port={args.ray_port}", f"--metrics-export-port={args.metrics_port}", *ray_flags],
                            # Its own group: Ctrl-C is for `serve run`, then we stop the node. No drain
                            # on SIGTERM (30 s by default, for Kubernetes upgrades): the node is the cluster.
                            start_new_session=True, env=os.environ | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    serving: subprocess.Popen | None = None

    def end_serving(signum, frame) -> None:
        if serving is None:
            raise KeyboardInterrupt
        # Ctrl-C in a terminal reaches `serve run` too, which then shuts Serve down; SIGTERM does not.
        if signum == signal.SIGTERM and serving.poll() is None:
            serving.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, end_serving)
    signal.signal(signal.SIGTERM, end_serving)
    try:
        wait_for_head(head, args.metrics_port)
        print(f"Ray's metrics: http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
        serving = subprocess.Popen([BIN / "serve", "run", "--address", f"127.0.0.1:{args.ray_port}", args.config])
        return serving.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_node(head)


def wait_for_head(head: subprocess.Popen, metrics_port: int) -> None:
    """The head is up once its exporter listens (the node's agent starts it last)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            sys.exit(f"`ray start --head` exited with status {head.returncode}; see its output above "
                     "(is another Ray already using these ports?).")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", metrics_port), timeout=1):
            return
        time.sleep(0.5)
    sys.exit(f"Ray's head node did not open port {metrics_port} within {START_TIMEOUT_S} s.")


def stop_node(node: subprocess.Popen) -> None:
    """Stop a `ray start --block` started in a process group of its own: on SIGTERM it
    stops its node's processes; SIGKILL if it has not within a minute."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


if __name__ == "__main__":
    sys.exit(main())
