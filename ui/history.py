"""Conversations kept in the browser, across reloads and restarts.

Gradio's ChatInterface(save_history=True) stores them in the browser's localStorage,
AES-encrypted in the browser with a secret the page's config carries. Gradio draws that
secret at process start, so a restarted page could no longer read what it saved. Here it
is stable: TEXTBOT_UI_SECRET, or a file made once (mode 0600, outside the checkout).

localStorage belongs to the browser, not to a login, and Gradio does not scope a
BrowserState by user. With login on, each user's page therefore gets a storage key and a
secret of its own (an HMAC of the user name with the secret), so a second user of the same
browser neither sees nor can decrypt the first one's conversations.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_ENV = "TEXTBOT_UI_SECRET"
DEFAULT_SECRET_FILE = Path("~/.config/textbot/chat-history-secret")
MIN_SECRET_CHARS = 16

# storage key -> secret of each page this process serves (per-user keys derive from them).
_pages: dict[str, str] = {}


def history_secret(secret_file: Path | None = None) -> str:
    """TEXTBOT_UI_SECRET, else the secret in `secret_file`, made there on first use."""
    if secret := os.environ.get(SECRET_ENV, "").strip():
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"{SECRET_ENV} is {len(secret)} characters; use at least {MIN_SECRET_CHARS} "
                             f"random ones (python -c 'import secrets; print(secrets.token_urlsafe(32))').")
        return secret
    path = (secret_file or DEFAULT_SECRET_FILE).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two pages starting at once must not each write a different secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise ValueError(f"Cannot keep the chat history secret in {path} ({error.strerror}): set "
                         f"{SECRET_ENV} or the page's history_secret_file to a writable place.") from None
    else:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"The chat history secret in {path} is shorter than {MIN_SECRET_CHARS} characters: "
                         f"delete the file to have a new one made (saved conversations are then lost).")
    return secret


def keep_history(page, storage_key: str, secret: str) -> None:
    """Give the ChatInterface's saved conversations a fixed storage key and secret."""
    page.saved_conversations.storage_key = storage_key
    page.saved_conversations.secret = secret
    _pages[storage_key] = secret
    _scope_to_user()


def user_scoped(storage_key: str, secret: str, user: str) -> tuple[str, str]:
    tag = hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()
    return f"{storage_key}.{tag[:16]}", tag


def _scope_to_user() -> None:
    """Rewrite, per request, the page config Gradio hands a logged-in browser (the HTML
    page and /config both build a deep copy, set its "username", then pass it through
    route_utils.update_root_in_config; this wraps that function)."""
    from gradio import route_utils

    original = route_utils.update_root_in_config
    if getattr(original, "textbot_scoped", False):
        return

    def update_root_in_config(config, root):
        config = original(config, root)
        if user := config.get("username"):
            for component in config.get("components", ()):
                props = component.get("props") or {}
                if props.get("storage_key") in _pages:
                    props["storage_key"], props["secret"] = user_scoped(
                        props["storage_key"], _pages[props["storage_key"]], str(user))
        return config

    update_root_in_config.textbot_scoped = True
    route_utils.update_root_in_config = update_root_in_config
