"""Optional API key for every /api route but health.

Off unless the environment variable TEXTBOT_API_KEY is set in the replica's
environment (for `make run`, in the shell that starts it; on a cluster, in the
runtime environment). Then requests need `Authorization: Bearer <key>` or, as
Anthropic's clients send it, `x-api-key: <key>`: HTTP answers 401 in the route's
error shape (backend/errors.py), a WebSocket is closed with 1008.
An ASGI middleware rather than a route dependency, so the docs, the OpenAPI
schema and the WebSocket are covered too.
"""

import hmac
import os

from backend.errors import error_response_for, route_path

API_KEY_ENV = "TEXTBOT_API_KEY"
OPEN_PATHS = {"/health"}


def configured_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def _presented_key(scope) -> str:
    """The bearer token, else the x-api-key header; empty if neither is sent."""
    headers = dict(scope.get("headers", ()))
    if (authorization := headers.get(b"authorization")) is not None:
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


class BearerKeyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        key = configured_key()
        if key is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = route_path(scope)
        presented = _presented_key(scope)
        if path in OPEN_PATHS or hmac.compare_digest(presented.encode(), key.encode()):
            return await self.app(scope, receive, send)
        reason = ("Missing API key: send the header 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
                  if not presented else "Invalid API key.")
        if scope["type"] == "websocket":
            # Accept, then close: a close before accept becomes a bare HTTP 403 without the reason.
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        response = error_response_for(scope, 401, reason, code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
