"""What the chat page does not offer, and refuses, whichever way it is hosted.

Gradio ships routes a text chat page has no use for (read from gradio 6.31's routes.py):
- /monitoring, /monitoring/summary, /monitoring/{key}: per-function counts and timings;
  mount_gradio_app leaves enable_monitoring at None, which answers the summary to anyone.
- /gradio_api/runs and /gradio_api/run-history/...: the run history (on by default).
- /gradio_api/upload, /gradio_api/upload_progress, /gradio_api/process_recording: files
  into the server's cache. The page takes text only.
- /gradio_api/vibe-edit, /vibe-code, /undo-vibe-edit, /vibe-starter-queries: an AI editor of
  the app's own source, on when GRADIO_VIBE_MODE is set to anything (even "0"), writing to
  the file GRADIO_WATCH_DEMO_PATH names. The page refuses to start with either set.
- /gradio_api/profiling/...: request traces, on with GRADIO_PROFILING.
Monitoring and run history are switched off with Gradio's own settings (HOSTING); the
middleware answers 403 for all of them, so a Gradio default changing later cannot open one.
"""

from __future__ import annotations

import json
import os
import re

from starlette.middleware import Middleware

CODE_EDITING_ENV = ("GRADIO_VIBE_MODE", "GRADIO_WATCH_DEMO_PATH")

REFUSED = re.compile(
    r"^/(?:monitoring(?:/.*)?"
    r"|gradio_api/(?:upload|upload_progress|process_recording|runs|run-history"
    r"|vibe-edit|undo-vibe-edit|vibe-code|vibe-starter-queries|profiling)(?:/.*)?)$")


class CodeEditingSwitchedOn(RuntimeError):
    pass


def refuse_code_editing() -> None:
    """Gradio reads these at import and at Blocks creation: refuse before serving anything."""
    if switched := [name for name in CODE_EDITING_ENV if os.environ.get(name)]:
        raise CodeEditingSwitchedOn(
            f"The chat page will not start with {' and '.join(switched)} set: it switches on Gradio's "
            f"routes that edit the app's source code from the browser. Unset it and start again.")


class RefuseRoutes:
    """ASGI middleware: 403 with a sentence for the routes above, before Gradio sees them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and REFUSED.match(_route_path(scope)):
            body = json.dumps({"detail": "Not offered by this chat page: it takes text messages only, "
                                         "and has no monitoring, run history or uploads."}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path below the page's mount point (Serve's route prefix arrives as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    return path[len(root):] if root and path.startswith(root + "/") else path


# Passed to both mount_gradio_app (Serve) and launch (standalone).
HOSTING = {
    "enable_monitoring": False,
    "run_history": False,
    "mcp_server": False,
    "show_error": True,  # gr.Error's sentence reaches the page; the chat function raises only those
    "max_file_size": 1,  # bytes: should an upload route ever get past the middleware
    "footer_links": ["api"],
}


def app_kwargs() -> dict:
    return {"middleware": [Middleware(RefuseRoutes)]}
