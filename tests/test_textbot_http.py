"""Textbot's tutorial endpoint, health and handle method, served by real Ray Serve (tiny models)."""

import json

import pytest
import requests


def stream_pieces(base_url: str, path: str, **params) -> list[str]:
    """Exactly the Ray Serve tutorial's client."""
    response = requests.post(f"{base_url}{path}", params=params, stream=True, timeout=120)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    return list(response.iter_content(chunk_size=None, decode_unicode=True))


@pytest.mark.parametrize("app", ["tiny-chat", "tiny-gpt2"])
def test_tutorial_client_streams_a_reply_in_pieces(base_url, app):
    pieces = stream_pieces(base_url, f"/{app}/", prompt="Tell me a story", max_new_tokens=20, temperature=0)
    assert len(pieces) > 1
    assert all(pieces)


def test_same_seed_same_reply_over_http(base_url):
    params = dict(prompt="Hello", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    assert "".join(stream_pieces(base_url, "/tiny-chat/", **params)) == "".join(
        stream_pieces(base_url, "/tiny-chat/", **params))


def test_stream_headers_disable_proxy_buffering(http):
    with http.stream("POST", "/tiny-chat/", params={"prompt": "Hi", "max_new_tokens": 2}) as response:
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"


def test_health_names_the_model(http, tiny_models):
    response = http.get("/tiny-chat/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "tiny-chat"}


@pytest.mark.parametrize(
    ("params", "param", "status"),
    [
        ({}, "prompt", 400),
        ({"prompt": "   "}, "prompt", 400),
        ({"prompt": "x" * 33_000}, "prompt", 413),
        ({"prompt": "Hi", "max_new_tokens": "many"}, "max_new_tokens", 400),
        ({"prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens", 400),
        ({"prompt": "Hi", "temperature": -1}, "temperature", 400),
        ({"prompt": "Hi", "top_p": 0}, "top_p", 400),
        ({"prompt": "Hi", "seed": -3}, "seed", 400),
    ],
)
def test_bad_query_parameters_get_a_clear_error(http, params, param, status):
    response = http.post("/tiny-chat/", params=params)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert param in error["message"]


def test_prompt_beyond_the_context_is_a_400_not_a_500(http):
    response = http.post("/tiny-gpt2/", params={"prompt": "Hello there! " * 800})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def relay(http, messages, sampling=None) -> list[dict]:
    response = http.post("/relay/", json={"messages": messages, "sampling": sampling})
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines()]


def test_handle_streams_pieces_to_another_deployment(http):
    events = relay(http, [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"}], {"max_new_tokens": 12, "temperature": 0})
    pieces = [e["piece"] for e in events]
    assert len(pieces) > 1
    # Same conversation over HTTP's single-prompt route differs only by the system message,
    # so compare against the handle itself: greedy replies are reproducible.
    again = relay(http, [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hello"}], {"max_new_tokens": 12, "temperature": 0})
    assert [e["piece"] for e in again] == pieces


def test_handle_rejects_a_bad_conversation_with_a_message(http):
    events = relay(http, [{"role": "wizard", "content": "Hello"}])
    assert len(events) == 1
    assert "Invalid chat request" in events[0]["error"]
