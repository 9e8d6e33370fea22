"""The end-to-end path on the embedded default model, as deploy.yaml serves it."""

import time

import requests


def test_default_model_streams_a_story_token_by_token(base_url):
    started = time.monotonic()
    arrivals, pieces = [], []
    with requests.post(f"{base_url}/api/", params={"prompt": "Tell me a short story about a fox.",
                                                  "max_new_tokens": 48, "temperature": 0},
                       stream=True, timeout=300) as response:
        response.raise_for_status()
        for piece in response.iter_content(chunk_size=None, decode_unicode=True):
            arrivals.append(time.monotonic() - started)
            pieces.append(piece)

    story = "".join(pieces)
    assert len(pieces) > 5
    assert len(story.split()) > 10
    # The first piece comes while the rest is still being generated.
    assert arrivals[0] < arrivals[-1] / 2


def test_default_model_replies_in_non_ascii_text(base_url):
    response = requests.post(f"{base_url}/api/", params={"prompt": "Écris « bonjour » en français.",
                                                        "max_new_tokens": 24, "temperature": 0}, timeout=300)
    assert response.status_code == 200
    assert "\ufffd" not in response.text
    assert response.text.strip()


def test_health_reports_the_default_model(base_url):
    assert requests.get(f"{base_url}/api/health", timeout=30).json() == {
        "status": "ok", "model": "SmolLM2-135M-Instruct"}
