"""The warm engine (backend/engine/process.py): an engine process started ahead of its replica,
as `make run` starts one while Serve starts, and adopted by the first replica that asks for it.
`make run` itself adopting one is checked in test_make_run.py."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.engine.process import WARM_ENGINE_ENV, EngineProcess, alive, start_warm_engine
from backend.protocol import ResolvedSampling
from backend.settings import EngineSettings, ModelSettings
from tests.conftest import ROOT
from tests.helpers.processes import wait_for

GREEDY = ResolvedSampling(max_new_tokens=12, temperature=0.0, top_p=1.0)


async def reply(engine: EngineProcess, prompt: str = "Hello there") -> list[str]:
    [generation] = await engine.submit_choices(prompt, GREEDY, 1)
    return [piece async for piece in generation]


@pytest.fixture
def warm_socket(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "engine.sock"
    monkeypatch.setenv(WARM_ENGINE_ENV, str(path))
    return path


def test_the_first_replica_adopts_the_warm_engine_the_next_gets_its_own(tiny_models, warm_socket):
    model = ModelSettings(source=str(tiny_models["tiny-chat"]))
    warm = start_warm_engine(warm_socket, model)
    try:
        wait_for(warm_socket.exists, 60, "the warm engine's socket")
        first = EngineProcess(model, EngineSettings(), 1)
        assert first.pid == warm.pid, "the replica started an engine of its own beside the warm one"
        assert not warm_socket.exists(), "a second replica could adopt the same engine"
        second = EngineProcess(model, EngineSettings(), 1)
        try:
            assert second.pid not in (warm.pid, None)
            adopted, own = asyncio.run(reply(first)), asyncio.run(reply(second))
            assert adopted and adopted == own, "the adopted engine replies otherwise than an engine of its own"
        finally:
            second.shutdown()
        first.shutdown()
        assert warm.wait(30) == 0, "the adopted engine did not end with its replica"
        # Its exit code is the launcher's: the replica can only tell that it went.
        assert wait_for(first.problem, 30, "the replica to see its engine go") == \
            "The engine process exited (exit code unknown)."
    finally:
        warm.kill()


def test_a_replica_asking_for_another_model_gets_that_model(tiny_models, warm_socket):
    loaded_ahead, asked = (ModelSettings(source=str(tiny_models[name])) for name in ("tiny-chat", "tiny-gpt2"))
    warm = start_warm_engine(warm_socket, loaded_ahead)
    try:
        wait_for(warm_socket.exists, 60, "the warm engine's socket")
        engine = EngineProcess(asked, EngineSettings(), 1)
        try:
            assert engine.pid == warm.pid
            assert engine.name == asked.served_name != loaded_ahead.served_name
            assert asyncio.run(reply(engine))
        finally:
            engine.shutdown()
    finally:
        warm.kill()


def test_a_warm_engine_nobody_adopts_ends_with_its_launcher(tiny_models, tmp_path):
    """Its launcher killed outright (no clean-up ran): the engine must not wait on forever."""
    launcher = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; from backend.engine.process import start_warm_engine; "
         "from backend.settings import ModelSettings; "
         "print(start_warm_engine(sys.argv[1], ModelSettings.model_validate_json(sys.argv[2]), "
         "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)",
         str(tmp_path / "engine.sock"), ModelSettings(source=str(tiny_models["tiny-chat"])).model_dump_json()],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 0, launcher.stderr[-2000:]
    engine_pid = int(launcher.stdout)
    wait_for(lambda: not alive(engine_pid), 90, "the orphaned warm engine to exit")


def test_without_a_warm_engine_a_replica_starts_its_own(tiny_models, warm_socket):
    """The variable names a socket nobody listens at (an adopted engine's, or a node started
    elsewhere): the replica's engine process is its own."""
    engine = EngineProcess(ModelSettings(source=str(tiny_models["tiny-chat"])), EngineSettings(), 1)
    try:
        parent = int(Path(f"/proc/{engine.pid}/stat").read_text().rpartition(")")[2].split()[1])
        assert parent == os.getpid(), "not an engine process of its own"
        assert asyncio.run(reply(engine))
    finally:
        engine.shutdown()
