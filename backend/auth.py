"""Optional API key for every /api route but health.

Off unless the environment variable TEXTBOT_API_KEY is set in the replica's
environment (for `make run`, in the shell that starts it; on a cluster, in the
runtime environment). Then requests need `Authorization: Bearer <key>`:
HTTP answers 401 in OpenAI's error shape, a WebSocket is closed with 1008.
An ASGI middleware rather than a route dependency, so the docs, the OpenAPI
schema and the WebSocket are covered too.
"""

import hmac
import os

from backend.errors import error_response

API_KEY_ENV = "TEXTBOT_API_KEY"
OPEN_PATHS = {"/health"}


def configured_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def _presented_key(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class BearerKeyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        key = configured_key()
        if key is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        presented = _presented_key(scope)
        if path in OPEN_PATHS or hmac.compare_digest(presented.encode(), key.encode()):
            return await self.app(scope, receive, send)
        reason = ("Missing API key: send the header 'Authorization: Bearer <key>'." if not presented
                  else "Invalid API key.")
        if scope["type"] == "websocket":
            # Accept, then close: a close before accept becomes a bare HTTP 403 without the reason.
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        response = error_response(401, reason, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
