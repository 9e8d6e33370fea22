"""One error shape for every /api route, OpenAI's:
`{"error": {"message", "type", "param", "code"}}` with a 4xx or 5xx status.

Programs written against OpenAI already know how to read it, and people get a
sentence saying what was wrong and where.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

# FastAPI is imported where a response is made, not here: the engine process raises these
# errors too, and has no HTTP to answer (fastapi's import was a tenth of its start).

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


class PromptTooLongError(ValueError):
    """The engine's: the prompt leaves no room in the model's context for a reply."""


class InvalidSamplingError(ValueError):
    """The engine's: a parameter the model cannot take (a token id beyond its vocabulary, a schema
    its grammar cannot enforce); `param` names it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineBusyError(RuntimeError):
    """The engine's: every generation slot and waiting place is taken; try again shortly."""


class GenerationError(RuntimeError):
    """The model failed while generating, or its replica was lost: the stream ends with this error."""


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _is_field(part) -> bool:
    """Field and header names and list indexes; not where the request came from ("body") nor the
    tags pydantic adds for a union's branches ("str", "list[TextPart]")."""
    if isinstance(part, int):
        return True
    return bool(re.fullmatch(r"[a-z_][a-z0-9_-]*", part)) and part not in _TYPE_TAGS | {"body", "query", "path", "header"}


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
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _describe(exc.errors()[0])
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette still logs the exception; the client gets a sentence, not a bare 500.
        return error_response(500, str(exc) or f"Internal error ({type(exc).__name__}).")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
