"""The shareable demo: `python -m ui --backend ... --share`, standalone, streaming over HTTP
from an application of two models (tiny-duo: tiny-chat, the default, and tiny-gpt2)."""

import subprocess
import sys
import time

import pytest

import os

from tests.conftest import ROOT
from tests.helpers.ports import free_port
from tests.helpers.page import (FIGURES_ID, assert_refused, figures_of, finished, model_named, page_client,
                                partials, reply_of)


@pytest.fixture(scope="module")
def standalone(base_url):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ui", "--backend", f"{base_url}/tiny-duo", "--port", str(port), "--share"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and not any("share link" in line.lower() for line in lines):
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
    yield f"http://127.0.0.1:{port}/", lines
    process.terminate()
    process.wait(timeout=30)


def test_offline_share_keeps_serving_locally_and_says_so_in_one_line(standalone):
    url, lines = standalone
    assert any(line.startswith(f"Chat page on {url}") for line in lines), lines
    share_lines = [line for line in lines if "share link" in line.lower()]
    assert len(share_lines) == 1 and share_lines[0].startswith("No share link"), lines


def api_reply(http, model: str | None = None) -> str:
    body = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"}],
            "max_tokens": 16, "temperature": 0} | ({"model": model} if model else {})
    return http.post("/tiny-duo/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_standalone_page_streams_from_the_http_api(standalone, http):
    url, _ = standalone
    outputs = partials(page_client(url), "Hello there", ("Be kind.", 0.0, 1.0, 16))
    assert len(outputs) > 2
    assert all(later.startswith(earlier) for earlier, later in zip(outputs, outputs[1:]))
    assert outputs[-1] == api_reply(http)  # no model picked: the default


def test_standalone_page_sends_the_picked_model(standalone, http):
    url, _ = standalone
    outputs = finished(page_client(url), "Hello there", ("Be kind.", 0.0, 1.0, 16, "tiny-gpt2"))
    assert reply_of(outputs[-1]) == api_reply(http, "tiny-gpt2") != api_reply(http, "tiny-chat")
    figures = figures_of(outputs[-1])
    assert model_named(figures["title"]) == "tiny-gpt2", figures


def test_standalone_page_refuses_a_model_the_backend_does_not_serve(standalone):
    url, _ = standalone
    job = page_client(url).submit("Hello there", "", 0.0, 1.0, 16, "gpt-5", api_name="/chat")
    with pytest.raises(Exception, match=r"The model 'gpt-5' is not served here; pick one of tiny-chat, tiny-gpt2\."):
        job.result(timeout=180)


def test_standalone_reply_has_figures_from_the_apis_usage(standalone):
    url, _ = standalone
    figures = figures_of(finished(page_client(url), "Hello there", ("", 0.0, 1.0, 16))[-1])
    assert model_named(figures["title"]) == "tiny-chat", figures
    note = FIGURES_ID.match(figures["id"])
    assert note and note["request_id"], f"no X-Request-ID from the backend: {figures}"


def test_standalone_page_is_hardened(standalone):
    url, _ = standalone
    assert_refused(url)


@pytest.mark.parametrize("variable", ["GRADIO_VIBE_MODE", "GRADIO_WATCH_DEMO_PATH"])
def test_page_refuses_to_start_with_code_editing_switched_on(variable):
    # Gradio switches vibe mode on for any non-empty value, "0" included.
    env = os.environ | {variable: "0" if variable == "GRADIO_VIBE_MODE" else "/tmp/app.py"}
    result = subprocess.run([sys.executable, "-m", "ui", "--backend", "http://127.0.0.1:9/api",
                             "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert f"will not start with {variable} set" in result.stderr
    assert "Traceback" not in result.stderr


def test_standalone_shows_backend_errors(standalone):
    url, _ = standalone
    job = page_client(url).submit("x" * 40_000, "", 0.0, 1.0, 16, api_name="/chat")
    with pytest.raises(Exception, match="limit is 32000"):
        job.result(timeout=180)  # a bound on "not hung"; a loaded CI machine took over 60 s once


def test_bad_backend_url_is_refused_with_a_message():
    result = subprocess.run([sys.executable, "-m", "ui", "--backend", "localhost:8000"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--backend must be an http(s) URL" in result.stderr
