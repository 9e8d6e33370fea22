"""A cap on request body size, before FastAPI reads a byte of JSON.

Prompts have their own limit in characters (max_prompt_chars); this one stops
a client from making the replica buffer megabytes to find that out.
"""

from backend.errors import error_response

MAX_BODY_BYTES = 1024 * 1024


def too_large_response():
    return error_response(413, f"The request body is over {MAX_BODY_BYTES // 1024} KiB; send less text.",
                          code="request_too_large")


class BodySizeLimitMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return await too_large_response()(scope, receive, send)

        if declared is None:
            # A chunked body declares no length: read it here, up to the limit, then replay it.
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return await self.app(scope, _replay([message]), send)
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_BODY_BYTES:
                    return await too_large_response()(scope, receive, send)
            receive = _replay([{"type": "http.request", "body": body, "more_body": False}], then=receive)
        await self.app(scope, receive, send)


def _replay(messages: list[dict], then=None):
    async def receive():
        if messages:
            return messages.pop(0)
        return await then() if then else {"type": "http.disconnect"}
    return receive


def install_body_limit(app) -> None:
    app.add_middleware(BodySizeLimitMiddleware)
