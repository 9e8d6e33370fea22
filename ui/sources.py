"""Backends for the chat function (ui/chat.py Backend): Textbot's models through Serve
handles, or over HTTP."""

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable

import httpx

from ui.chat import Usage

Notify = Callable[[str], None]


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """A server-sent event stream's lines, split at line feeds only (SSE's line ends). Not
    httpx's `aiter_lines`, which splits as str.splitlines does, also inside a JSON string at
    U+2028, U+0085 and the like, which a model's reply may hold (a random test model's did)."""
    pending = ""
    async for text in response.aiter_text():
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


def dropped_notice(dropped: int) -> str:
    return (f"The conversation outgrew the model's context: its {dropped} oldest "
            f"message{'s' if dropped > 1 else ''} no longer reach the model.")


# How long the page waits for the Textbot application's ingress to say which models it serves.
MODELS_TIMEOUT_S = 10.0


class HandleBackend:
    """A Textbot application's models through their DeploymentHandles (inside Serve), reached the
    way its HTTP ingress reaches them (backend/routing.py): the replica checks the text, fits the
    conversation to the context and says how many turns it left out. The pieces carry the token
    counts the figures under a reply need."""

    def __init__(self, app_name: str):
        from backend.routing import ServedModels

        self.app_name = app_name
        # Asked lazily: the application's ingress may start after the page.
        self.served = ServedModels(app_name)

    async def models(self) -> dict[str, bool]:
        try:
            return await asyncio.wait_for(self._models(), MODELS_TIMEOUT_S)
        except TimeoutError:
            raise BackendError(f"the application {self.app_name!r} did not say which models it serves within "
                               f"{MODELS_TIMEOUT_S:.0f} s; it may still be starting.") from None

    async def _models(self) -> dict[str, bool]:
        from ray import serve

        names = (await self.served.get()).names
        # The ingress counts running replicas from Serve's controller: asking wakes no model.
        loaded = await serve.get_deployment_handle("TextbotAPI", app_name=self.app_name).loaded_models.remote()
        return {name: name in loaded for name in names}

    async def stream(self, messages: list[dict], sampling: dict, notify: Notify,
                     session: str | None = None, model: str | None = None) -> AsyncIterator[str | Usage]:
        from backend.protocol import ChatMessage, SamplingParams
        from backend.routing import RemoteReply

        handle = (await self.served.get()).handle(model)
        # The session id routes the turn to the replica holding the conversation's prefix cache.
        reply = RemoteReply(handle, "page", [ChatMessage(**m) for m in messages], SamplingParams(**sampling),
                            session=session, truncate=True, param="content")
        last = None
        async for piece in reply:  # Stop or a closed tab: Gradio cancels us, and the reply frees its place
            if last is None and piece.dropped:
                notify(dropped_notice(piece.dropped))
            last = piece
            if piece.text:
                yield piece.text
        if last is not None:
            # Serve's request id: the one on the Textbot replica's log line for this reply.
            yield Usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens, reply.request_id)


class BackendError(RuntimeError):
    """The backend answered with an error; `message` is its sentence."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class HttpBackend:
    """The backend's OpenAI-compatible API over HTTP (standalone page): GET /v1/models for the
    models, chat completions for the replies."""

    def __init__(self, backend_url: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.backend_url = backend_url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=backend_url.rstrip("/") + "/", headers=headers,
                                        timeout=httpx.Timeout(timeout_s, connect=10.0))

    def _unreachable(self, error: httpx.TransportError) -> BackendError:
        return BackendError(f"cannot reach the backend at {self.backend_url} ({error.__class__.__name__}).")

    async def models(self) -> dict[str, bool]:
        try:
            response = await self.client.get("v1/models", timeout=MODELS_TIMEOUT_S)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if response.status_code != 200:
            raise BackendError(_error_message(response))
        try:
            # The API lists the default first; a backend that predates `loaded` has them all up.
            served = {card["id"]: card.get("loaded", True) is not False for card in response.json()["data"]}
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"{self.backend_url}/v1/models did not answer with a list of models.") from None
        if not served:
            raise BackendError(f"{self.backend_url} serves no model.")
        return served

    async def stream(self, messages: list[dict], sampling: dict, notify: Notify,
                     session: str | None = None, model: str | None = None) -> AsyncIterator[str | Usage]:
        body = {"messages": messages, "stream": True, "temperature": sampling.get("temperature"),
                "top_p": sampling.get("top_p"), "max_tokens": sampling.get("max_new_tokens"),
                "truncation": "auto", "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        try:
            async with self.client.stream("POST", "v1/chat/completions", json=body,
                                          headers={"x-session-id": session} if session else None) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise BackendError(_error_message(response))
                if dropped := int(response.headers.get("x-textbot-dropped-messages", "0")):
                    notify(dropped_notice(dropped))
                request_id = response.headers.get("x-request-id")
                async for piece in openai_pieces(sse_lines(response), usage=True):
                    yield piece if isinstance(piece, str) else dataclasses.replace(piece, request_id=request_id)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error


async def openai_pieces(lines: AsyncIterator[str], usage: bool = False) -> AsyncIterator[str | Usage]:
    """The text pieces of an OpenAI chat-completions SSE stream, and with `usage` its usage
    chunk (`stream_options.include_usage`) as a Usage; an error event raises BackendError."""
    async for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:
            raise BackendError(chunk["error"]["message"])
        for choice in chunk.get("choices", ()):
            if piece := choice["delta"].get("content"):
                yield piece
        if usage and (counts := chunk.get("usage")):
            details = counts.get("prompt_tokens_details") or {}
            yield Usage(counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0),
                        details.get("cached_tokens") or 0)


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"the backend answered HTTP {response.status_code}."
