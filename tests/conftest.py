"""One real Ray Serve instance for the whole test session.

It serves deploy.yaml itself, as `serve run deploy.yaml` does (same config
schema, same controller call), on a free port, with extra applications for the
tests: Textbot on two tiny models the session builds, and a relay deployment
that streams from Textbot through a handle.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# Ray's workers inherit the environment of the first ray.init: let them import
# backend/, ui/ and tests/ from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

API_KEY = "test-key-not-a-secret"
PAGE_LOGIN = ("ada", "lovelace-1815")
TINY_APPS = {"tiny-chat": "build_tiny_chat_model", "tiny-gpt2": "build_tiny_gpt2",
             "tiny-broken": "build_broken_model"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_deploy_config() -> dict:
    return yaml.safe_load((ROOT / "deploy.yaml").read_text())


def app_config(config: dict, name: str) -> dict:
    return next(app for app in config["applications"] if app["name"] == name)


def tiny_app(name: str, source: Path, **engine) -> dict:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "backend.app:build_app",
        "args": {"model": {"source": str(source), "name": source.name},
                 "generation": {"max_new_tokens": 24, "temperature": 0.0}, "engine": engine},
        "deployments": [{"name": "Textbot", "max_ongoing_requests": 8,
                         "ray_actor_options": {"num_cpus": 0}}],
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tests import tiny_models

    folder = tmp_path_factory.mktemp("models")
    return {name: getattr(tiny_models, builder)(folder / name) for name, builder in TINY_APPS.items()}


@pytest.fixture(scope="session")
def serve_config(tiny_models) -> dict:
    config = copy.deepcopy(load_deploy_config())
    config["http_options"]["port"] = free_port()
    config["applications"] += [tiny_app(name, path) for name, path in tiny_models.items()]
    app_config(config, "tiny-broken")["args"]["generation"]["temperature"] = 1.0  # NaN logits fail sampling
    # Small limits, to see overload and the wall-clock cap; a replica the fault tests may kill.
    busy = tiny_app("tiny-busy", tiny_models["tiny-chat"], max_running=1, max_waiting=4)
    busy["args"]["generation"]["max_new_tokens"] = 2000  # WebSocket replies long enough to overlap
    config["applications"].append(busy)
    config["applications"].append(tiny_app("tiny-capped", tiny_models["tiny-chat"], max_seconds=0.3))
    config["applications"].append(tiny_app("tiny-victim", tiny_models["tiny-chat"]))
    config["applications"].append({
        "name": "relay", "route_prefix": "/relay", "import_path": "tests.relay:build",
        "args": {"textbot_app": "tiny-chat"},
    })
    # The chat page on the tiny chat model, greedy by default, for exact checks.
    config["applications"].append({
        "name": "tiny-page", "route_prefix": "/tiny-page", "import_path": "ui.deployment:build_app",
        "args": {"textbot_app": "tiny-chat", "generation": {"temperature": 0.0, "max_new_tokens": 16}},
    })
    # The chat page on the default model, greedy and short: exact multi-turn checks in a browser.
    config["applications"].append({
        "name": "greedy-page", "route_prefix": "/greedy-page", "import_path": "ui.deployment:build_app",
        "args": {"textbot_app": "textbot", "generation": {"temperature": 0.0, "max_new_tokens": 24}},
    })
    # Access control switched on through the environment, as an operator would.
    locked = tiny_app("tiny-locked", tiny_models["tiny-chat"])
    locked["runtime_env"] = {"env_vars": {"TEXTBOT_API_KEY": API_KEY}}
    config["applications"].append(locked)
    config["applications"].append({
        "name": "locked-page", "route_prefix": "/locked-page", "import_path": "ui.deployment:build_app",
        "args": {"textbot_app": "tiny-chat"},
        "runtime_env": {"env_vars": {"TEXTBOT_UI_USER": PAGE_LOGIN[0], "TEXTBOT_UI_PASSWORD": PAGE_LOGIN[1]}},
    })
    # The chat page on tiny-gpt2 (256-token context): long conversations get trimmed.
    config["applications"].append({
        "name": "gpt2-page", "route_prefix": "/gpt2-page", "import_path": "ui.deployment:build_app",
        "args": {"textbot_app": "tiny-gpt2", "generation": {"temperature": 0.0, "max_new_tokens": 16}},
    })
    # The chat page in front of the small-capacity backend: it must say when it is busy.
    config["applications"].append({
        "name": "busy-page", "route_prefix": "/busy-page", "import_path": "ui.deployment:build_app",
        "args": {"textbot_app": "tiny-busy"},
    })
    # A model source that cannot load: shows the failure a person would see.
    config["applications"].append(tiny_app("broken", Path("/nonexistent/model")))
    return config


@pytest.fixture(scope="session")
def serve_instance(serve_config):
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    client = serve_api.serve_start(http_options=serve_config["http_options"])
    client.deploy_apps(ServeDeploySchema.model_validate(serve_config))
    wait_until_running([app["name"] for app in serve_config["applications"] if app["name"] != "broken"],
                       timeout_s=300)
    yield f"http://127.0.0.1:{serve_config['http_options']['port']}"
    serve.shutdown()
    ray.shutdown()


def wait_until_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve applications failed to deploy: {failed}")
        if all(n in apps and apps[n].status == "RUNNING" for n in names):
            return
        time.sleep(1)
    raise TimeoutError(f"Serve applications not running after {timeout_s} s: "
                       f"{ {n: apps[n].status for n in names if n in apps} }")


@pytest.fixture(scope="session")
def base_url(serve_instance) -> str:
    return serve_instance


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_page_url(base_url) -> str:
    return f"{base_url}/tiny-page/"
