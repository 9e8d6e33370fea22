"""`make run` as a person runs it: the app on :8000, Ray's Prometheus exporter with
Textbot's metrics on :8080 (the README's URLs), then Ctrl-C stops all of it.

Its Ray node stands beside the test session's: its own temp dir and the ports the
session's Ray also uses by default are moved with RAY_FLAGS; 8000 and 8080 stay.
"""

import os
import signal
import subprocess
import tempfile
import time

import httpx

from tests.conftest import ROOT, free_port
from tests.processes import kill_processes_mentioning, wait_for
from tests.test_operations import textbot_samples

APP = "http://127.0.0.1:8000"
METRICS = "http://127.0.0.1:8080/metrics"


def test_make_run_serves_and_exports_metrics_on_8080_until_ctrl_c(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    flags = (f"--ray-port={free_port()} --temp-dir={temp_dir} --dashboard-port={free_port()} "
             f"--dashboard-agent-listen-port={free_port()} --ray-client-server-port={free_port()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        # Its own process group, so that Ctrl-C can go to all of it, as a terminal sends it.
        make = subprocess.Popen(["make", "run", f"RAY_FLAGS={flags}"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: make.poll() is None and httpx.get(f"{APP}/api/health", timeout=5).status_code == 200
                 or make.poll() is not None, 300, "`make run` to serve /api/health")
        assert make.poll() is None, log.read_text()[-3000:]

        reply = httpx.post(f"{APP}/api/", params={"prompt": "Hello", "max_new_tokens": 8}, timeout=60)
        assert reply.status_code == 200 and reply.text
        assert httpx.get(f"{APP}/", timeout=30).status_code == 200  # the chat page

        samples = wait_for(lambda: (s := textbot_samples(METRICS, "textbot"))
                           .get("ray_textbot_completion_tokens_total", 0) >= 1 and s, 90,
                           "Textbot's metrics at :8080")
        print({k: v for k, v in sorted(samples.items())})
        assert samples["ray_textbot_time_to_first_token_seconds_count"] >= 1
        assert 0 < samples["ray_textbot_request_duration_seconds_sum"] < 60
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        started = time.monotonic()
        try:
            make.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
        stopped_s = time.monotonic() - started
        leftovers = kill_processes_mentioning(temp_dir)
    print(f"Ctrl-C to `make run` ended: {stopped_s:.1f} s")
    assert stopped_s < 120, log.read_text()[-3000:]
    assert not leftovers, f"processes of `make run`'s Ray outlived it: {leftovers}"
    assert wait_for(lambda: not port_open(8080) and not port_open(8000), 30, "ports 8000 and 8080 to close")


def port_open(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    except httpx.TransportError:
        return False
    return True
