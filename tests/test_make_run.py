"""`make run` as a person runs it: the app and Ray's Prometheus exporter with Textbot's
metrics, then Ctrl-C stops all of it and leaves nothing a later Ray start would follow
(issue 12: `make test` after `make run` used to join the dead node).

The test's `make run` stands beside the test session's Ray and beside any `make run` serving
on this machine: it gets free ports through the Makefile's variables (HTTP_PORT,
METRICS_PORT, RAY_PORT, as the README says) and the other fixed ports of a Ray head through
RAY_FLAGS; RAY_TMPDIR gives it a Ray temp dir of its own, which Ray then uses as it uses
/tmp/ray on a person's machine (ray_current_cluster, session_latest).
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from backend.engine import cpus
from backend.engine.process import alive
from backend.launch import forget_node
from tests.conftest import ROOT
from tests.helpers.processes import kill_processes_mentioning, wait_for
from tests.helpers.metrics import textbot_samples
from tests.helpers.ports import free_port, listening, port_open

# In a fresh process, after `make run` has stopped: a later Ray start, first as any script
# starts one (ray.init() with no address: it follows ray_current_cluster), then as the test
# session does (tests.conftest.start_local_ray), with RAY_ADDRESS naming the dead node to boot.
LATER_RAY_STARTS = """
import json, os, sys
import ray
from tests.conftest import start_local_ray

def started(context):
    node = ray._private.worker._global_node
    return {"gcs_address": context.address_info["gcs_address"], "processes": sorted(node.all_processes)}

print(json.dumps(started(ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING"))))
ray.shutdown()
os.environ["RAY_ADDRESS"] = sys.argv[1]
print(json.dumps(started(start_local_ray(num_cpus=1, include_dashboard=False, logging_level="WARNING"))))
ray.shutdown()
"""


def test_make_run_serves_then_ctrl_c_leaves_nothing_a_later_ray_start_follows(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_dir = Path(ray_tmp, "ray")  # what /tmp/ray is on a person's machine
    http_port, metrics_port, ray_port = free_port(), free_port(), free_port()
    app, metrics = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    flags = (f"--dashboard-port={free_port()} --dashboard-agent-listen-port={free_port()} "
             f"--ray-client-server-port={free_port()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    log = tmp_path / "make-run.log"
    # Whether an engine of another `make run` on this machine holds the CPU ours would claim.
    last_cpu_free = bool(cpus.claim(1, {max(os.sched_getaffinity(0))}))
    for lock in cpus._held:
        lock.close()
    cpus._held.clear()
    with open(log, "wb") as out:
        # Its own process group, so that Ctrl-C can go to all of it, as a terminal sends it.
        make = subprocess.Popen(["make", "run", f"HTTP_PORT={http_port}", f"METRICS_PORT={metrics_port}",
                                 f"RAY_PORT={ray_port}", f"RAY_FLAGS={flags}"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: make.poll() is None and httpx.get(f"{app}/api/health", timeout=5).status_code == 200
                 or make.poll() is not None, 300, "`make run` to serve /api/health")
        assert make.poll() is None, log.read_text()[-3000:]

        reply = httpx.post(f"{app}/api/", params={"prompt": "Hello", "max_new_tokens": 8}, timeout=60)
        assert reply.status_code == 200 and reply.text
        # The chat page: deployed once the model's application runs (backend/launch.py), so a little later.
        wait_for(lambda: httpx.get(f"{app}/", timeout=30).status_code == 200, 120, "the chat page at /")
        engine = check_the_engine_has_a_cpu_of_its_own(ray_tmp, last_cpu_free)
        # Its one engine process is the warm engine the launcher started, adopted by the replica.
        assert "A model replica adopted this warm engine" in log.read_text(), log.read_text()[-3000:]

        samples = wait_for(lambda: (s := textbot_samples(metrics, "textbot"))
                           .get("ray_textbot_completion_tokens_total", 0) >= 1 and s, 90,
                           f"Textbot's metrics at :{metrics_port}")
        print({k: v for k, v in sorted(samples.items())})
        assert samples["ray_textbot_time_to_first_token_seconds_count"] >= 1
        assert 0 < samples["ray_textbot_request_duration_seconds_sum"] < 60

        # What issue 12 tripped on: the node's address, for ray.init() without one to join.
        dead_node = (ray_dir / "ray_current_cluster").read_text().strip()
        assert dead_node.endswith(f":{ray_port}"), dead_node
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        started = time.monotonic()
        try:
            make.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
        stopped_s = time.monotonic() - started
        leftovers = kill_processes_mentioning(ray_tmp)
    print(f"Ctrl-C to `make run` ended: {stopped_s:.1f} s")
    assert stopped_s < 120, log.read_text()[-3000:]
    assert not leftovers, f"processes of `make run`'s Ray outlived it: {leftovers}"
    assert wait_for(lambda: not alive(engine), 30, "the model's engine process to end with `make run`")
    assert wait_for(lambda: not any(map(port_open, (http_port, metrics_port, ray_port))), 30,
                    "make run's ports to close")
    assert not (ray_dir / "ray_current_cluster").exists(), "make run left its dead node as Ray's current cluster"
    assert (ray_dir / "session_latest" / "logs" / "serve").is_dir(), "make run's logs are no longer findable"

    # The reported sequence goes on with `make test`: a Ray started as the test session starts it.
    later = subprocess.run([sys.executable, "-c", LATER_RAY_STARTS, dead_node], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    leftovers = kill_processes_mentioning(ray_tmp)
    assert later.returncode == 0, later.stderr[-3000:]
    for start in map(json.loads, later.stdout.strip().splitlines()):
        print("a later Ray start:", start)
        assert start["gcs_address"] != dead_node
        assert {"gcs_server", "raylet"} <= set(start["processes"]), "it joined a cluster instead of starting one"
    assert len(later.stdout.strip().splitlines()) == 2
    assert not leftovers, f"processes of the later Ray starts outlived them: {leftovers}"
    shutil.rmtree(ray_tmp, ignore_errors=True)  # kept when a check fails: Ray's logs are there


def test_a_second_launcher_on_a_taken_port_stops_at_once_saying_which_and_what_to_do(tmp_path):
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    env = ({k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
           | {"RAY_TMPDIR": str(ray_tmp)})
    with listening() as http_port, listening() as metrics_port:
        # As one runs it by hand: one port taken.
        alone = subprocess.run([sys.executable, "-m", "backend.launch", f"--http-port={http_port}",
                                f"--metrics-port={free_port()}", f"--ray-port={free_port()}", "deploy.yaml"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        # As `make run` beside another: two taken.
        make = subprocess.run(["make", "run", f"HTTP_PORT={http_port}", f"METRICS_PORT={metrics_port}",
                               f"RAY_PORT={free_port()}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    print(alone.stderr, make.stderr, sep="")
    assert alone.returncode != 0 and not alone.stdout
    assert re.fullmatch(rf"Port {http_port} \(HTTP\) is already in use \(is another `make run` serving\?\); stop it "
                        r"or choose another: python -m backend\.launch --http-port=\d+\n", alone.stderr), alone.stderr
    assert make.returncode != 0
    sentence = next(line for line in make.stderr.splitlines() if not line.startswith("make"))
    assert re.fullmatch(rf"Ports {http_port} \(HTTP\) and {metrics_port} \(metrics\) are already in use \(is "
                        r"another `make run` serving\?\); stop it or choose others: make run HTTP_PORT=\d+ "
                        r"METRICS_PORT=\d+", sentence), sentence
    assert "Traceback" not in make.stderr + make.stdout
    assert not any(ray_tmp.iterdir()), "it started something before refusing"


def test_make_run_and_readme_agree_on_the_default_ports():
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    variables = dict(re.findall(r"^(HTTP_PORT|METRICS_PORT|RAY_PORT) :=[ \t]*(\S*)$", makefile, re.MULTILINE))
    assert variables == {"HTTP_PORT": "", "METRICS_PORT": "8080", "RAY_PORT": "6379"}
    # HTTP_PORT empty: the launcher serves on the config's own port.
    http_port = yaml.safe_load((ROOT / "deploy.yaml").read_text())["http_options"]["port"]
    assert http_port == 8000
    assert f"http://127.0.0.1:{http_port}/" in readme
    assert f"http://127.0.0.1:{variables['METRICS_PORT']}/metrics" in readme
    assert "HTTP_PORT=" in readme and "METRICS_PORT=" in readme


def test_a_stopped_node_is_forgotten_only_where_the_address_file_still_names_it(tmp_path):
    address_file = tmp_path / "ray_current_cluster"
    ours, elsewhere = free_port(), free_port()
    with listening() as alive:
        dead = free_port()
        cases = [
            # (file now, file before make run) -> file after
            (f"10.0.0.1:{ours}", None, None),  # ours: removed
            (f"10.0.0.1:{ours}", f"127.0.0.1:{alive}", f"127.0.0.1:{alive}"),  # the node before still runs
            (f"10.0.0.1:{ours}", f"127.0.0.1:{dead}", None),  # the node before has stopped too
            (f"10.0.0.1:{ours}", f"10.0.0.1:{ours}", None),  # a stale file named our address already
            (f"10.0.0.1:{elsewhere}", None, f"10.0.0.1:{elsewhere}"),  # another node's since: untouched
        ]
        for now, before, after in cases:
            address_file.write_text(now)
            forget_node(address_file, ours, before)
            assert (address_file.read_text() if address_file.exists() else None) == after, (now, before)
    forget_node(tmp_path / "absent", ours, None)  # no file: nothing to do


def check_the_engine_has_a_cpu_of_its_own(ray_tmp: str, last_cpu_free: bool) -> int:
    """Given two CPUs or more, `make run` sets the last aside for the engine (backend/engine/cpus.py):
    once the model runs (before the chat page is deployed), its node's processes run on the others,
    the chat page's replica among them, and its engine process on that one (if no other engine holds it)."""
    usable = os.sched_getaffinity(0)
    node = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, "cmdline", ray_tmp)]
    engines = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
               and _mentions(p, "cmdline", "backend.engine.process") and _mentions(p, "environ", f"RAY_TMPDIR={ray_tmp}")]
    assert node and len(engines) == 1, (node, engines)
    others = usable - {max(usable)} if len(usable) >= 2 else usable
    assert all(os.sched_getaffinity(pid) == others for pid in node), [os.sched_getaffinity(pid) for pid in node]
    expected = {max(usable)} if len(usable) >= 2 and last_cpu_free else others
    assert os.sched_getaffinity(engines[0]) == expected
    return engines[0]


def _mentions(proc: Path, what: str, text: str) -> bool:
    with contextlib.suppress(OSError):
        return text in (proc / what).read_bytes().decode(errors="replace")
    return False

