"""CPUs set aside for the engine process (backend/engine/cpus.py, backend/launch.py): who
claims what, and what --engine-cpus refuses. `make run` itself is checked in test_make_run.py."""

import os
import subprocess
import sys

import pytest

from backend.engine import cpus
from backend.launch import cpus_for_engines
from tests.conftest import ROOT

HOLD_ONE = """
import sys, time
from pathlib import Path
from backend.engine import cpus
print(cpus.claim(1, {int(sys.argv[1]), int(sys.argv[2])}, Path(sys.argv[3])), flush=True)
sys.stdin.readline()
"""


def test_each_engine_process_claims_cpus_no_live_one_holds_and_frees_them_when_it_ends(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", HOLD_ONE, "5", "7", str(tmp_path)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "[5]"
        assert cpus.claim(2, {5, 7}, tmp_path) is None, "two were free while another process held one"
        assert cpus._held == [], "a failed claim must not keep the CPU it did get"
        mine = cpus.claim(1, {5, 7}, tmp_path)
        assert mine == [7]
    finally:
        first.communicate("\n", timeout=30)
    assert cpus.claim(1, {5}, tmp_path) == [5], "a CPU stays claimed after its process ended"
    for lock in cpus._held:
        lock.close()
    cpus._held.clear()


PIN = """
import os
from backend.engine import cpus
os.sched_setaffinity(0, {0})  # where the node's processes run once the launcher moved them
pinned = cpus.pin_engine(1)
print(pinned, sorted(os.sched_getaffinity(0)), flush=True)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to set one aside")
def test_an_engine_pins_to_a_free_cpu_set_aside_else_runs_on_every_cpu(tmp_path):
    """The first engine gets the CPU set aside to itself; the next (another model's, say) finds it
    claimed and runs on it and the node's CPU alike, so it gets the set-aside core while the first
    engine idles, rather than only the core Ray and Serve run on."""
    env = os.environ | {cpus.ENV: "1", "TMPDIR": str(tmp_path)}  # the lock files live in the temp folder
    first = subprocess.Popen([sys.executable, "-c", PIN + "import sys; sys.stdin.readline()"], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().split() == ["[1]", "[1]"], "the first engine did not get CPU 1 alone"
        second = subprocess.run([sys.executable, "-c", PIN], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.stdout.split() == ["None", "[0,", "1]"], second.stdout + second.stderr
    finally:
        first.communicate("\n", timeout=30)


def test_the_engine_is_pinned_only_where_the_node_set_cpus_aside(monkeypatch):
    monkeypatch.delenv(cpus.ENV, raising=False)
    assert cpus.pin_engine(1) is None


@pytest.mark.parametrize(("wanted", "available", "expected"), [
    ("auto", {0, 1}, {1}), ("auto", {0, 1, 2, 3}, {3}), ("auto", {4}, set()), ("none", {0, 1}, set()),
    ("2-3", {0, 1, 2, 3}, {2, 3}), ("1,3", {0, 1, 2, 3}, {1, 3}),
])
def test_engine_cpus_by_default_the_last_of_two_or_more(wanted, available, expected):
    assert cpus_for_engines(wanted, available) == expected


@pytest.mark.parametrize(("wanted", "says"), [
    ("0,1", "leaves no CPU for Ray and Serve"),
    ("9", "CPU 9 is not among this machine's"),
    ("two", "numbers and ranges, e.g. 3 or 2,3 or 2-3"),
    ("-1", "numbers and ranges"),
])
def test_engine_cpus_that_cannot_work_are_refused_with_a_sentence(wanted, says):
    with pytest.raises(ValueError, match=says):
        cpus_for_engines(wanted, {0, 1})


def test_the_launcher_refuses_bad_engine_cpus_before_starting_anything():
    run = subprocess.run([sys.executable, "-m", "backend.launch", "--engine-cpus=lots", "deploy.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--engine-cpus: CPUs are listed as numbers and ranges" in run.stderr, run.stderr
