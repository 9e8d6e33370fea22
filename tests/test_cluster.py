"""A multi-node Ray cluster on this machine: a head and a worker node, each with
one CPU and its own processes, `serve deploy` of deploy.yaml's textbot
application with two model replicas (one per node), requests served by both,
then the worker node stopped and traffic carrying on with the head's replica.

The cluster is separate from the test session's Ray (its own ports and temp
dir) and every process it starts is stopped at the end.
"""

import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from backend.launch import stop_node
from tests.conftest import ROOT, app_config, load_deploy_config
from tests.helpers.ports import free_port
from tests.helpers.processes import kill_processes_mentioning, wait_for

BIN = Path(sys.executable).parent


def ray_node(*args: str, temp_dir: str, env: dict) -> subprocess.Popen:
    """`ray start ... --block`: the node lives as long as this process group."""
    # Each node of this machine needs its own agent port (the default, 52365, is the test session's).
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={free_port()}", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def replicas_that_replied(log_dir: str) -> dict[str, int]:
    counts = {}
    for path in glob.glob(os.path.join(log_dir, "**", "replica_textbot_Textbot_*.log"), recursive=True):
        counts[Path(path).name] = sum('"event": "reply"' in line for line in open(path, errors="replace"))
    return {name: n for name, n in counts.items() if n}


@pytest.fixture
def two_node_cluster(tiny_models):
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    # Ray 2.60 turns token auth on when ~/.ray/auth_token exists; say which, for the same run everywhere.
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    head = ray_node("--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                    "--include-dashboard=true", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                    temp_dir=temp_dir, env=env)
    nodes = [head]
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{dashboard}/api/version", timeout=2).status_code == 200,
                 120, "head node's dashboard")
        worker = ray_node(f"--address=127.0.0.1:{gcs}", "--num-cpus=1", temp_dir=temp_dir, env=env)
        nodes.append(worker)
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir, "worker": worker, "env": env}
    finally:
        for node in reversed(nodes):
            stop_node(node)
        leftovers = kill_processes_mentioning(temp_dir)
        assert not leftovers, f"processes of the test cluster outlived it: {leftovers}"


def test_two_nodes_share_the_traffic_and_one_carries_on_alone(two_node_cluster, tiny_models, tmp_path):
    cluster = two_node_cluster
    http_port = free_port()
    # deploy.yaml's textbot application, on a tiny model, two model replicas (one CPU each).
    app = app_config(load_deploy_config(), "textbot")
    [default, *_] = app["args"]["models"]
    deployment = {key: value for key, value in default["deployment"].items() if key != "autoscaling_config"}
    app["args"]["models"] = [{"source": str(tiny_models["tiny-chat"]), "name": "tiny-chat",
                              "engine": default["engine"], "deployment": deployment | {"num_replicas": 2}}]
    config = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": http_port},
              "applications": [app]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))

    deployed = subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "cluster.yaml"),
                               "--address", cluster["dashboard"]], env=cluster["env"],
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    api = f"http://127.0.0.1:{http_port}/api"
    wait_for(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 240, "the application")

    def ask(i: int) -> int:
        return httpx.post(f"{api}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 8}).status_code

    logs = os.path.join(cluster["temp_dir"], "session_latest", "logs", "serve")
    with ThreadPoolExecutor(8) as pool:
        # Replicas may still be starting on the worker node: ask until both have replied.
        both = wait_for(lambda: all(code == 200 for code in pool.map(ask, range(16)))
                        and len(replicas_that_replied(logs)) == 2 and replicas_that_replied(logs),
                        120, "replies from both replicas")
    print("replies per replica, both nodes up:", both)

    stop_node(cluster["worker"])  # the worker node goes away, with its replica
    codes = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and codes[-5:] != [200] * 5:
        with contextlib.suppress(httpx.HTTPError):
            codes.append(ask(len(codes)))
    print("after the worker node stopped:", codes)
    assert codes[-5:] == [200] * 5
    alive = json.loads(subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json",
                                       "--address", cluster["dashboard"]], env=cluster["env"],
                                      capture_output=True, text=True, timeout=60).stdout or "[]")
    assert sum(node.get("state") == "ALIVE" for node in alive) == 1
