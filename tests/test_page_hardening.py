"""The chat page offers a text chat and nothing else: Gradio's monitoring, run history,
uploads and code-editing routes are refused, analytics are off, and a login scopes the
conversations kept in the browser to the user."""

import httpx
import pytest

from tests.conftest import PAGE_LOGIN
from tests.helpers.page import assert_refused
from ui.history import history_secret, user_scoped

def test_served_page_refuses_monitoring_history_uploads_and_code_editing(tiny_page_url):
    assert_refused(tiny_page_url)


def test_served_default_page_is_hardened_too(base_url):
    assert_refused(f"{base_url}/")


def test_logged_in_users_get_their_own_history_key_and_secret(base_url):
    url = f"{base_url}/locked-page/"
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{url}login", data={"username": PAGE_LOGIN[0], "password": PAGE_LOGIN[1]}).is_success
        [saved] = [c["props"] for c in client.get(f"{url}config").json()["components"]
                   if c.get("type") == "browserstate"]
    base = "textbot_conversations_locked-page"
    # The page replica runs as this user, so it keeps its secret in the same file.
    ada = user_scoped(base, history_secret(), PAGE_LOGIN[0])
    assert (saved["storage_key"], saved["secret"]) == ada
    assert user_scoped(base, history_secret(), "bob") != ada  # another user: other key, other secret


@pytest.mark.parametrize("secret", ["short"])
def test_a_weak_secret_is_refused_with_a_sentence(monkeypatch, secret):
    monkeypatch.setenv("TEXTBOT_UI_SECRET", secret)
    with pytest.raises(ValueError, match="use at least 16 random"):
        history_secret()
