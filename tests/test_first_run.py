"""The README's `make run` on a machine that has never run anything (issue 27).

Every developer and CI machine had run Ray before, so its token file (~/.ray/auth_token)
was there, and the first `make run` on a new machine, which must make it, failed where no
test looked. Here `make run` runs in a copy of this checkout with nothing of a used machine:
- a home folder that holds nothing (no ~/.ray, ~/.cache/textbot, ~/.config/textbot, no pip
  cache, no wheels);
- a temp folder that holds nothing (no /tmp/ray, no torch's compile caches);
- no virtual environment, so it installs the requirements itself;
- an environment that names no cache: only the variables that say where the machine's
  programs and package indexes are (PATH, PYENV_ROOT, PIP_*), its locale and user.

The first run installs, converts the model, compiles the decode step, serves a chat on the
page and an OpenAI request, and stops on Ctrl-C. In the environment it installed (no test
tools, so no matplotlib), the README's third command, `python -m bench`, writes its tables.
The second run, in the same home, comes up from the caches the first one made.
"""

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
from openai import OpenAI

from tests.conftest import ROOT
from tests.helpers.page import FIGURES, figures_of, finished, page_client, reply_of
from tests.helpers.ports import free_port, port_open
from tests.helpers.processes import kill_processes_mentioning, wait_for

# Installing from nothing (the package downloads), converting the model and compiling the decode step.
FIRST_START_S = 1800
LATER_START_S = 300
# What says where the machine's programs, Python and package indexes are; nothing else is inherited.
MACHINE = re.compile(r"PATH|PYENV_ROOT|PIP_(?!CACHE_DIR|NO_CACHE).*|LANG|LC_.*|TZ|USER|LOGNAME|SHELL|TERM")
# A line of the launch log that only a start from nothing prints, and one only a start from the caches.
CONVERTED = "Saved the converted model to"
COMPILED = "Compiled the decode step to"
FROM_CACHE = "from its converted copy in"


def test_the_first_make_run_on_a_new_machine_serves_and_the_second_starts_from_its_caches(tmp_path):
    checkout = copy_of_checkout(tmp_path / "textbot")
    home = tmp_path / "home"
    home.mkdir()
    temp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if MACHINE.fullmatch(k)} | {"HOME": str(home), "TMPDIR": str(temp)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if str(ROOT) not in p)
    try:
        first = serve_and_stop(checkout, env, temp, tmp_path / "first.log", FIRST_START_S, bench_out=tmp_path / "bench")
        assert CONVERTED in first and COMPILED in first, first[-3000:]
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # made by the launcher, private
        assert (home / ".config" / "textbot" / "chat-history-secret").is_file()  # made by the chat page

        second = serve_and_stop(checkout, env, temp, tmp_path / "second.log", LATER_START_S)
        assert FROM_CACHE in second and CONVERTED not in second and "Compiling the decode step" not in second, \
            second[-3000:]
        assert "pip install" not in second, "the second run installed again"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def copy_of_checkout(where: Path) -> Path:
    """The files a clone of this checkout has (with this checkout's uncommitted changes), nothing else."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, where / name)
    return where


def serve_and_stop(checkout: Path, env: dict, temp: Path, log: Path, start_s: float,
                   bench_out: Path | None = None) -> str:
    """`make run` on free ports until it answers a chat on the page and an OpenAI request (and, given
    `bench_out`, a short `python -m bench` from its own environment), then Ctrl-C. Its log."""
    http_port, metrics_port, ray_port = free_port(), free_port(), free_port()
    app = f"http://127.0.0.1:{http_port}"
    flags = (f"--dashboard-port={free_port()} --dashboard-agent-listen-port={free_port()} "
             f"--ray-client-server-port={free_port()}")
    with open(log, "wb") as out:
        # Its own process group, so that Ctrl-C goes to all of it, as a terminal sends it.
        make = subprocess.Popen(["make", "run", f"HTTP_PORT={http_port}", f"METRICS_PORT={metrics_port}",
                                 f"RAY_PORT={ray_port}", f"RAY_FLAGS={flags}"], cwd=checkout, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        wait_for(lambda: make.poll() is not None or httpx.get(f"{app}/api/health", timeout=5).status_code == 200,
                 start_s, f"`make run` to serve /api/health ({log})")
        assert make.poll() is None, log.read_text()[-5000:]
        print(f"{log.name}: serving after {time.monotonic() - started:.0f} s")

        openai = OpenAI(base_url=f"{app}/api/v1", api_key="unused", timeout=120)
        completion = openai.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0,
                                                    messages=[{"role": "user", "content": "Say hello."}])
        assert completion.choices[0].message.content and completion.usage.completion_tokens >= 1

        # The page is deployed once the model runs (backend/launch.py), so a little later.
        wait_for(lambda: httpx.get(f"{app}/", timeout=30).status_code == 200, 300, "the chat page at /")
        reply = finished(page_client(f"{app}/"), "Say hello.", ("", 0.0, 1.0, 16))[-1]
        assert reply_of(reply) and FIGURES.match(figures_of(reply)["title"]), reply

        if bench_out:
            run_the_bench(checkout, env, app, bench_out)
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        try:
            make.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        leftovers = kill_processes_mentioning(str(temp))
    text = log.read_text()
    assert make.returncode not in (None, -signal.SIGKILL), text[-3000:]
    assert not leftovers, f"processes of `make run` outlived its Ctrl-C: {leftovers}"
    assert wait_for(lambda: not any(map(port_open, (http_port, metrics_port, ray_port))), 30, "make run's ports to close")
    assert "InvalidAuthToken" not in text, text[-5000:]
    return text


def run_the_bench(checkout: Path, env: dict, app: str, out: Path) -> None:
    """The README's third command, from the environment `make run` installed: it has no test tools,
    so no matplotlib. The tables are written all the same, and one line says how to get the plot."""
    bench = subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-m", "bench", "--targets", "openai",
                            "--concurrency", "1", "--max-tokens", "8", "--url", app, "--no-start", "--out", str(out)],
                           cwd=checkout, env=env | {"PYTHONPATH": str(checkout)}, capture_output=True, text=True,
                           timeout=600)
    print(bench.stdout[-2000:], bench.stderr[-2000:])
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert re.search(r"No plot at .*: matplotlib is not installed here", bench.stdout), bench.stdout[-2000:]
    tables = (out / "BENCHMARKS.md").read_text()
    assert re.search(r"^\| 1 \| [\d.]+ \|", tables, re.MULTILINE), tables
    assert (out / "benchmarks" / "results.json").is_file() and not (out / "benchmarks" / "throughput.png").exists()


def test_ray_auth_is_settled_before_ray_is_imported_on_a_machine_without_a_token(tmp_path):
    """Issue 27's reproduction: with no token file, the launcher makes one and Ray, imported after,
    runs with token auth, as the head it starts does. Importing the launcher imports no Ray."""
    script = ("import sys; import backend.launch as launch; assert 'ray' not in sys.modules, 'the launcher imports Ray'; "
              "launch.settle_ray_auth(); from ray._raylet import get_authentication_mode, AuthenticationMode; "
              "print(get_authentication_mode() == AuthenticationMode.TOKEN)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    settled = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert settled.returncode == 0 and settled.stdout.strip() == "True", settled.stderr[-2000:]
    token = tmp_path / ".ray" / "auth_token"
    made = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", made) and token.stat().st_mode & 0o777 == 0o600
    # A second launcher keeps it.
    again = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.stdout.strip() == "True" and token.read_text() == made
