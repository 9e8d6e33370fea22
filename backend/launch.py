"""`make run`: a Ray head node of our own, with its Prometheus exporter on
--metrics-port, deploy.yaml served onto it by `serve run` (on --http-port), and that
node, and only that node, stopped when serving ends (Ctrl-C, or SIGTERM from a process
manager). It leaves nothing behind that changes what a later Ray start does.

Why not `serve run` alone: the Ray it starts cannot be asked for a metrics port.
Why not `ray start --head` ... `ray stop`: `ray stop` stops every Ray node on the
machine, someone else's test session included.

It does what `serve run --address ... deploy.yaml` does (Serve started, the config
submitted, Ray's worker logs printed here, Serve shut down on Ctrl-C) in its own
process, for a quicker start (docs/BENCHMARKS.md, restart to first token): Ray and
Serve import here while the node starts; Serve starts as soon as the node's GCS answers
(the metrics exporter comes up beside it); the config's first application (the model's)
is deployed alone and the others once it runs, so its replicas do not share the two
CPUs with the chat page's Gradio; the node runs without Ray's dashboard (a web UI and
the REST API of `serve deploy`/`serve status`; Prometheus' exporter is the node's agent,
not the dashboard): pass --include-dashboard=true to have it. Given two CPUs or more, the
last is set aside for the model's engine process and everything else runs on the others
(--engine-cpus; backend/engine/cpus.py says why). Once the node answers, it starts the model's
engine process (a warm engine, backend/engine/process.py), which imports torch and loads the
weights while Serve starts; the model's replica adopts it.

    python -m backend.launch [--http-port 8000] [--metrics-port 8080] [--ray-port 6379] [--engine-cpus auto]
                             [ray start flags] deploy.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from backend.config import TEXTBOT_IMPORT, DeployConfig
from backend.engine import process as engine_process
from backend.engine.cpus import ENV as ENGINE_CPUS_ENV, parse as parse_cpus
from backend.settings import TextbotSettings

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to `ray start`, e.g. --temp-dir=/tmp/mine.")
    parser.add_argument("config", help="the Serve config file to serve, e.g. deploy.yaml")
    parser.add_argument("--http-port", type=int, help="Serve's HTTP port (default: the config's http_options.port)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus exporter (default 8080)")
    parser.add_argument("--ray-port", type=int, default=6379, help="the head node's GCS port (default 6379)")
    parser.add_argument("--engine-cpus", default="auto",
                        help="CPUs set aside for the model's engine processes, e.g. 3 or 2-3; everything else "
                             "runs on the others. auto (default): the last CPU, given two or more; none: no CPU set aside")
    args, ray_flags = parser.parse_known_args()
    if not Path(args.config).is_file():
        parser.error(f"no Serve config at {args.config}")
    config = DeployConfig.read(args.config).raw
    http_options = config.setdefault("http_options", {})
    http_host = http_options.get("host", "127.0.0.1")  # Serve's defaults
    http_port = args.http_port or http_options.get("port", 8000)

    # A wrong flag is said first, whatever else runs on this machine (a `make run` serving, say).
    try:
        engine_cpus = cpus_for_engines(args.engine_cpus, os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
                                       else set(range(os.cpu_count() or 1)))
    except ValueError as exc:
        parser.error(f"--engine-cpus: {exc}")
    # Before anything starts: a second `make run` would otherwise end in a Ray traceback.
    wanted = [(http_port, "HTTP", http_host), (args.metrics_port, "METRICS", ""), (args.ray_port, "RAY", "")]
    if taken := [(port, what) for port, what, host in wanted if not port_is_free(host, port)]:
        sys.exit(ports_taken_sentence(taken))
    http_options["port"] = http_port
    # Ray reads its environment once, at its first import: all of it is decided before that.
    settle_ray_auth()

    def stop_serving(signum, frame) -> None:
        # Ctrl-C in a terminal, or SIGTERM from a process manager: the same clean stop.
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop_serving)
    signal.signal(signal.SIGTERM, stop_serving)
    if engine_cpus:
        # Engine processes claim these (backend/engine/cpus.py); the rest moves off them once the
        # model runs (deploy_first_application_first): while the node starts, it has every CPU.
        os.environ[ENGINE_CPUS_ENV] = ",".join(map(str, sorted(engine_cpus)))
    # Where the warm engine will wait, named now: Ray's processes (the replicas) inherit it from the node.
    warm_socket = Path(tempfile.mkdtemp(prefix="textbot-warm-engine-")) / "engine.sock"
    os.environ[engine_process.WARM_ENGINE_ENV] = str(warm_socket)
    warm_engine = None
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", "--disable-usage-stats",
                             # No dashboard unless asked for (a later flag wins): a dozen processes
                             # fewer to start on two CPUs; the metrics exporter does not need it.
                             "--include-dashboard=false",
                             f"--port={args.ray_port}", f"--metrics-export-port={args.metrics_port}", *ray_flags],
                            # Its own group: Ctrl-C is for us, then we stop the node. No drain
                            # on SIGTERM (30 s by default, for Kubernetes upgrades): the node is the cluster.
                            start_new_session=True, env=os.environ | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    address_file = address_before = None
    serving = False
    preparing = None
    try:
        # Read before the head writes it, seconds from now (`ray start` writes it once its node is up).
        address_file = ray_address_file(ray_flags)
        address_before = read_text(address_file)
        # While the node starts (its first seconds wait on its own processes).
        import ray
        from ray.serve._private import api as serve_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(config)  # a wrong config fails here, before Serve starts
        wait_for_port(head, args.ray_port, "its GCS")
        threading.Thread(target=report_metrics_port, args=(head, args.metrics_port), daemon=True).start()
        # As `serve run --address` does it: a driver whose workers' logs print here.
        ray.init(address=f"127.0.0.1:{args.ray_port}", namespace="serve")
        # Not before: started with the node, it slowed the node's start as much as it saved
        # (on two CPUs); from here it has seconds to load before the model's replica asks for it.
        warm_engine = start_warm_engine(config, warm_socket)
        print(f"Running config file: '{args.config}'.", flush=True)
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location,
                                       grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                       controller_options=schema.controller_options)
        serving = True
        deploy_first_application_first(client, schema, head, engine_cpus)
        preparing = prepare_sleeping_models(args.config)
        return head.wait() or 1  # the node ended under us
    except KeyboardInterrupt:
        return 130
    finally:
        # A second Ctrl-C while the node stops must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if serving and head.poll() is None:
            print("Shutting down Serve...", flush=True)
            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
        if "ray" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["ray"].shutdown()
        if preparing and preparing.poll() is None:
            preparing.kill()  # its half-written files are staged under names of their own
            preparing.wait()
        stop_node(head)
        stop_warm_engine(warm_engine, warm_socket.parent)
        if address_file:
            forget_node(address_file, args.ray_port, address_before)


def cpus_for_engines(wanted: str, available: set[int]) -> set[int]:
    """The CPUs to set aside for engine processes: `wanted` as --engine-cpus gives it, of the
    CPUs this process may use. ValueError with a sentence when that leaves nothing for the rest."""
    if wanted == "none":
        return set()
    if not hasattr(os, "sched_setaffinity"):  # Linux has it; macOS does not
        if wanted == "auto":
            return set()
        raise ValueError("setting CPUs aside needs Linux (os.sched_setaffinity); use none here")
    if wanted == "auto":
        return {max(available)} if len(available) >= 2 else set()
    cpus = parse_cpus(wanted)
    if outside := cpus - available:
        raise ValueError(f"CPU {','.join(map(str, sorted(outside)))} is not among this machine's "
                         f"(usable here: {','.join(map(str, sorted(available)))})")
    if not available - cpus:
        raise ValueError("that leaves no CPU for Ray and Serve: set fewer aside, or none")
    return cpus


def start_warm_engine(config: dict, socket_path: Path) -> subprocess.Popen | None:
    """The engine process for the default model of the config's first application, started to load while
    Serve starts, waiting at `socket_path` for the model's replica to adopt it
    (backend/engine/process.py). None when that application is not Textbot's or its args do not
    validate: Serve's build of it says why, as before."""
    first = (config.get("applications") or [{}])[0]
    if first.get("import_path") != TEXTBOT_IMPORT:
        return None
    try:
        settings = TextbotSettings.model_validate(first.get("args") or {})
    except ValidationError:
        return None
    # Ctrl-C is for the launcher: the engine ends with its replica, or in stop_warm_engine.
    engine = engine_process.start_warm_engine(socket_path, settings.default.model_settings(), start_new_session=True)
    # Reaped as soon as it exits, so that its replica, which waits for its pid to go, sees it go.
    threading.Thread(target=engine.wait, name="warm-engine-reaper", daemon=True).start()
    return engine


def stop_warm_engine(engine: subprocess.Popen | None, folder: Path) -> None:
    """Once the node has stopped: an adopted engine has ended with its replica; one that was
    not adopted ends here."""
    if engine and engine.poll() is None:
        engine.terminate()
        try:
            engine.wait(10)
        except subprocess.TimeoutExpired:
            engine.kill()
    shutil.rmtree(folder, ignore_errors=True)


def settle_ray_auth() -> None:
    """Token auth for the node and for this driver, with a token made if there is none.

    Ray 2.60's head turns token auth on when it finds a token (~/.ray/auth_token), but a
    client given an explicit address, like ours, only when RAY_AUTH_MODE says so; so it is said
    once, for both. It must be said before Ray is first imported, here or anywhere: Ray fixes its
    auth mode at that import. Making the token with Ray's own helper imported Ray too early, and
    on a machine that had never run Ray the driver ran with auth off against a head that demanded
    the new token (issue 27). So the token is written here, as `ray get-auth-token --generate`
    writes it: 32 random bytes in hex, where Ray looks for it."""
    if "ray" in sys.modules:
        raise RuntimeError("Ray was imported before its environment was settled: its auth mode is already fixed")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two launchers starting at once on a new machine must not write two tokens.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))


def prepare_sleeping_models(config: str) -> subprocess.Popen:
    """The converted copy and compiled step of each model that sleeps until asked, built in the
    background at the lowest priority once the app serves: so the first `make run` serves as
    soon as the models loaded at start are ready (`make run` prepares those before serving),
    and a sleeping model's first request later waits for a replica's start only. One that
    comes sooner prepares the model itself (the files are staged, so two builders do not
    clash). Quick once all are prepared."""
    return subprocess.Popen([sys.executable, "-m", "backend.engine.compiled", "--which", "asleep", config],
                            start_new_session=True, preexec_fn=lambda: os.nice(19))


def deploy_first_application_first(client, schema, head: subprocess.Popen, engine_cpus: set[int]) -> None:
    """Submit the config's first application alone, the rest once it runs (or fails, or
    after START_TIMEOUT_S): on two CPUs the model's replica then starts without the chat
    page's imports beside it. Resubmitting the first unchanged leaves it as it is. In
    between, everything but the engines moves off `engine_cpus`."""
    from ray.serve.schema import ApplicationStatus

    first, *rest = schema.applications
    if rest:
        client.deploy_apps(schema.model_copy(update={"applications": [first]}), _blocking=False)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and head.poll() is None:
            status = client.get_serve_status(first.name).app_status.status
            if status not in (ApplicationStatus.NOT_STARTED, ApplicationStatus.DEPLOYING):
                break
            time.sleep(0.2)
    if engine_cpus:
        keep_off(engine_cpus, head.pid)
    client.deploy_apps(schema, _blocking=False)
    print("Submitted deploy config successfully.", flush=True)


def keep_off(engine_cpus: set[int], head_pid: int) -> None:
    """This process and every process of the node under `head_pid` (Ray's, Serve's, the
    replicas', every thread of each) onto the CPUs that are not `engine_cpus`, but for the
    engine processes, which run on CPUs of those already. Processes started later inherit it."""
    others = os.sched_getaffinity(0) - engine_cpus
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pids = [os.getpid(), head_pid], []
    while tree:
        pid = tree.pop()
        pids.append(pid)
        tree += children.get(pid, [])
    for pid in pids:
        for thread in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            with contextlib.suppress(OSError):  # gone meanwhile
                if not os.sched_getaffinity(int(thread.name)) <= engine_cpus:
                    os.sched_setaffinity(int(thread.name), others)
    print(f"The model's engine runs on CPU {','.join(map(str, sorted(engine_cpus)))}; Ray, Serve and the rest "
          f"now on CPU {','.join(map(str, sorted(others)))} (--engine-cpus).", flush=True)


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port (host "" is every interface). SO_REUSEADDR as
    servers set it: connections of a server that just stopped (TIME_WAIT) do not count."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def ports_taken_sentence(taken: list[tuple[int, str]]) -> str:
    """One sentence: the ports in use and the command that moves them, e.g. "Port 8000 is already
    in use (is another `make run` serving?); stop it or choose another: make run HTTP_PORT=8001"."""
    names = {"HTTP": "HTTP", "METRICS": "metrics", "RAY": "Ray's GCS"}
    used = {port for port, _ in taken}
    moves = []
    for port, what in taken:
        other = port + 1
        while other in used or not port_is_free("", other):
            other += 1
        used.add(other)
        # Under make (it sets MAKELEVEL) the Makefile's variables, else this module's flags.
        moves.append(f"{what}_PORT={other}" if "MAKELEVEL" in os.environ
                     else f"--{what.lower()}-port={other}")
    ports = [f"{port} ({names[what]})" for port, what in taken]
    listed = ports[0] if len(ports) == 1 else ", ".join(ports[:-1]) + " and " + ports[-1]
    command = "make run" if "MAKELEVEL" in os.environ else "python -m backend.launch"
    return (f"Port{'s' if len(ports) > 1 else ''} {listed} {'are' if len(ports) > 1 else 'is'} already in use "
            f"(is another `make run` serving?); stop it or choose "
            f"{'others' if len(ports) > 1 else 'another'}: {command} {' '.join(moves)}")


def ray_address_file(ray_flags: list[str]) -> Path:
    """Where `ray start --head` records its address for later `ray.init()` calls without one
    (Ray's ray_current_cluster file): in --temp-dir if given, else in Ray's default temp dir."""
    from ray._common.utils import get_ray_address_file

    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--temp-dir")
    return Path(get_ray_address_file(flags.parse_known_args(ray_flags)[0].temp_dir))


def read_text(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return None


def forget_node(address_file: Path, ray_port: int, address_before: str | None) -> None:
    """After our node has stopped: a ray_current_cluster file naming it would make the next
    `ray.init()` without an address try to join that dead node (and refuse num_cpus). It names our
    node if it names our GCS port: that port was free when we started and ours until now. Then the
    file goes, or gets back the address it held before if that node still answers; written since
    by another node (`ray start` elsewhere), it stays as it is.

    Ray's session_latest link stays: it points at the session that just ended, whose logs
    (logs/serve/, the README's place for request logs) are what one reads after a stop, and no
    Ray start reads it (each new node points it at its own session): removing it would only hide
    those logs. The same for prom_metrics_service_discovery.json, a link into that session for
    Prometheus: it lists the stopped node's exporter, which is no longer there, and the next head
    node replaces it."""
    address = read_text(address_file)
    if not address or address.rpartition(":")[2] != str(ray_port):
        return
    if address_before and address_before != address and answers(address_before):
        address_file.write_text(address_before)
    else:
        address_file.unlink(missing_ok=True)


def answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def wait_for_port(head: subprocess.Popen, port: int, what: str) -> None:
    """Until the head node listens on `port`, or exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            sys.exit(f"`ray start --head` exited with status {head.returncode}; see its output above "
                     "(is another Ray already using these ports?).")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    sys.exit(f"Ray's head node did not open {what} (port {port}) within {START_TIMEOUT_S} s.")


def report_metrics_port(head: subprocess.Popen, metrics_port: int) -> None:
    """The node's agent opens the exporter last, while Serve starts: say where it is once it is."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and head.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", metrics_port), timeout=1):
            print(f"Ray's metrics: http://127.0.0.1:{metrics_port}/metrics", flush=True)
            return
        time.sleep(0.25)


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
