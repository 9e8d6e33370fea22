"""The one path from a conversation to a model replica, for every caller: the HTTP ingress
(backend/api.py) and the chat page (ui/sources.py) alike.

    Models.handle(name)   which model: its Textbot deployment, the default when none is named,
                          a 404 naming the served models for an unknown one
    RemoteReply(...)      the routing key (conversation_key), the stream from a replica, and
                          Serve's failures told as the client's errors (served_error)

What happens at the replica (the text check, fitting the context, the system prompt, the
reply) is Textbot.stream_reply's, written once there.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve import context as serve_context
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from backend.errors import RETRY_AFTER_S, APIError, GenerationError
from backend.protocol import ChatMessage, ReplyPiece, SamplingParams, ToolSpec

_REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def replica_cause(error: Exception) -> Exception:
    """The exception a Textbot replica raised, without Ray's RayTaskError wrapper (`.cause`)."""
    return getattr(error, "cause", None) or error


def served_error(error: Exception, mid_reply: bool) -> Exception:
    """What a failed call to a Textbot replica means to the client; Serve's own
    errors say the replica is full or gone."""
    cause = replica_cause(error)
    if isinstance(cause, (APIError, GenerationError)):
        return cause
    if isinstance(cause, BackPressureError):
        return APIError(503, "Every replica of the model is at capacity. Try again in a few seconds.",
                        code="overloaded", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(cause, _REPLICA_LOST):
        if mid_reply:
            return GenerationError(f"The model replica stopped mid-reply ({type(cause).__name__}); "
                                   "send the request again.")
        return APIError(503, "No model replica could take the request; one is restarting. "
                        "Try again in a few seconds.", code="unavailable", headers={"Retry-After": RETRY_AFTER_S})
    return error


def conversation_key(session_id: str | None, messages: list[ChatMessage] | str | list[int]) -> str:
    """The key that routes a request to a model replica (Textbot's router hashes it: see
    backend/settings.py, DeploymentOptions.request_router_config), so a conversation's turns
    meet its prefix cache: the client's session id, else the conversation's opening, which
    every later turn repeats (for a plain prompt, its first 256 characters or tokens)."""
    if session_id:
        return session_id
    if not messages or not isinstance(messages[0], ChatMessage):
        return hashlib.sha256(json.dumps(messages[:256]).encode()).hexdigest()[:32]
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages) - 1)
    opening = [(m.role, m.content) for m in messages[:first_user + 1]]
    return hashlib.sha256(json.dumps(opening).encode()).hexdigest()[:32]


class Models:
    """The served models by name, each its Textbot deployment's handle; the first is the default."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles
        self.default = next(iter(handles))

    @property
    def names(self) -> list[str]:
        return list(self.handles)

    def name(self, asked: str | None, param: str = "model") -> str:
        """The model a request asks for: `asked`, or the default when it names none."""
        if asked is None or asked == "":
            return self.default
        if asked not in self.handles:
            served = ", ".join(repr(name) for name in self.handles)
            raise APIError(404, f"The model {asked!r} does not exist; this server serves {served}.",
                           param=param, code="model_not_found")
        return asked

    def handle(self, asked: str | None, param: str = "model") -> DeploymentHandle:
        return self.handles[self.name(asked, param)]


class RemoteReply:
    """A reply streaming from a Textbot replica (Textbot.stream_reply): iterate once for its
    pieces (ReplyPiece: text, token counts, and with `n` > 1 the choice's index), or `text()`
    for its text. `prompt` is a conversation (which may call `tools`), a text, or token ids.
    `dropped`: how many of the conversation's oldest messages `truncate` left out, once the
    first piece is in."""

    def __init__(self, handle: DeploymentHandle, route: str, prompt: list[ChatMessage] | str | list[int],
                 sampling: SamplingParams, strict: bool = False, session: str | None = None,
                 tools: list[ToolSpec] | None = None, truncate: bool = False, param: str = "messages"):
        key = conversation_key(session, prompt)
        self._response = _own_call(lambda: handle.options(stream=True, session_id=key)
                                   .stream_reply.remote(prompt, sampling, strict, route, tools, truncate, param))
        self._open = True
        self.dropped = 0

    @property
    def request_id(self) -> str:
        """Serve's request id: the one on the Textbot replica's log line for this reply."""
        return self._response.request_id

    async def __aiter__(self) -> AsyncIterator[ReplyPiece]:
        started = False
        try:
            async for piece in self._response:
                started = True
                self.dropped = piece.dropped
                yield piece
            self._open = False
        except Exception as error:
            raise served_error(error, started) from None
        finally:
            if self._open:  # the client went away (or pressed Stop): free the replica's place now
                self._response.cancel()

    async def text(self) -> AsyncIterator[str]:
        async for piece in self:
            if piece.text:
                yield piece.text


def _own_call(call):
    """`call()` (a handle's .remote()) as a request of its own to Serve's router. A call made while
    serving a request inherits that request's internal id, and the router files its waiting
    requests by that id, one per id: of two calls from one request that wait together (a
    completion of two prompts), the second was never routed and its client waited forever
    (Ray 2.x's request_router.py, _pending_requests_by_id). The request id in the logs stays the
    client's."""

    def with_fresh_id():
        current = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(
            dataclasses.replace(current, _internal_request_id=str(uuid.uuid4())))
        return call()

    return contextvars.copy_context().run(with_fresh_id)


class ServedModels:
    """The models an application serves, for a caller outside its ingress (the chat page): asked
    of its TextbotAPI once, then reached as the ingress reaches them, deployment by deployment."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._models: Models | None = None

    async def get(self) -> Models:
        if self._models is None:
            from ray import serve

            from backend.settings import deployment_name

            names = await serve.get_deployment_handle("TextbotAPI", app_name=self.app_name).model_names.remote()
            self._models = Models({name: serve.get_deployment_handle(deployment_name(name), app_name=self.app_name)
                                   for name in names})
        return self._models
