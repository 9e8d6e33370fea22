"""Errors in the shape each route family's clients read, with a 4xx or 5xx status:
Anthropic's `{"type": "error", "error": {"type", "message"}}` under /v1/messages, OpenAI's
`{"error": {"message", "type", "param", "code"}}` everywhere else.

Programs written against either API already know how to read its shape, and people get a
sentence saying what was wrong and where.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

# The engine's errors, defined in the engine that raises them: the same classes, which the service
# catches and answers (backend/textbot.py, routing.py, api.py).
from backend.engine.errors import (  # noqa: F401
    EngineBusyError,
    GenerationError,
    InvalidSamplingError,
    PromptTooLongError,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

# FastAPI is imported where a response is made, not here: backend.protocol, which the chat page
# and the model replicas import, needs only APIError.

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


# Seconds a refused client should wait; a reply of the default length takes about this long.
RETRY_AFTER_S = "5"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def __reduce__(self):
        # Crosses from a Textbot replica to the ingress by pickle; keep every field.
        return APIError, (self.status, self.message, self.param, self.code, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# Anthropic's error types by status (its API documents these).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}

# Paths (below the application's route prefix) whose clients read Anthropic's error shape.
ANTHROPIC_PATHS = ("/v1/messages",)


def anthropic_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def route_path(scope) -> str:
    """The request's path below the application's route prefix (Serve's root_path)."""
    return scope["path"].removeprefix(scope.get("root_path", "")) or "/"


def is_anthropic(scope) -> bool:
    return route_path(scope).startswith(ANTHROPIC_PATHS)


def error_response_for(scope, status: int, message: str, param: str | None = None, code: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:
    """The error in the shape the route's clients read."""
    if is_anthropic(scope):
        return anthropic_error_response(status, message, headers)
    return error_response(status, message, param, code, headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _is_field(part) -> bool:
    """Field and header names and list indexes; not where the request came from ("body") nor the
    tags pydantic adds for a union's branches ("str", "list[TextPart]")."""
    if isinstance(part, int):
        return True
    return bool(re.fullmatch(r"[a-z_][a-z0-9_-]*", part)) and part not in _TYPE_TAGS | {"body", "query", "path", "header"}


def _most_specific(errors: list[dict]) -> dict:
    """Of a request's validation errors, the one deepest in the request: a union's branches
    each fail, and the deepest says what is wrong in the branch the client meant (a bad item
    in a list, not "Input should be a valid string")."""
    return max(errors, key=lambda e: len(e.get("loc", ())))


def _describe(error: dict) -> tuple[str, str | None]:
    """A pydantic/FastAPI validation error as a sentence and the parameter it concerns."""
    location = [str(part) for part in error.get("loc", ()) if _is_field(part)]
    param = ".".join(location) or None
    where = f"'{param}'" if param else "the request"
    return f"Invalid {where}: {error.get('msg', 'invalid value')}.", param


def install_error_handlers(app: FastAPI) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response_for(request.scope, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # The routes that came before the Responses and Messages APIs keep naming the first error.
        older = not (is_anthropic(request.scope) or route_path(request.scope).startswith("/v1/responses"))
        message, param = _describe(exc.errors()[0] if older else _most_specific(exc.errors()))
        return error_response_for(request.scope, 400, message, param, "invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette still logs the exception; the client gets a sentence, not a bare 500.
        return error_response_for(request.scope, 500, str(exc) or f"Internal error ({type(exc).__name__}).")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response_for(request.scope, exc.status_code, str(exc.detail), headers=exc.headers)
