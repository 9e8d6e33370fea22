"""Stream sources for the chat function: Textbot through a Serve handle, or over HTTP."""

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


def handle_source(app_name: str):
    """Stream from a Textbot application's models through their DeploymentHandles (inside Serve),
    the way its HTTP ingress does (backend/routing.py): the replica checks the text, fits the
    conversation to the context and says how many turns it left out. The pieces carry the token
    counts the figures under a reply need."""
    from backend.protocol import ChatMessage, SamplingParams
    from backend.routing import RemoteReply, ServedModels

    served = ServedModels(app_name)

    async def stream(messages: list[dict], sampling: dict, notify: Notify,
                     session: str | None = None, model: str | None = None) -> AsyncIterator[str | Usage]:
        handle = (await served.get()).handle(model)
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

    return stream


class BackendError(RuntimeError):
    """The backend answered with an error; `message` is its sentence."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def http_source(backend_url: str, api_key: str | None = None, timeout_s: float = 300.0):
    """Stream from the backend's OpenAI-compatible chat completions over HTTP (standalone page)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.AsyncClient(base_url=backend_url.rstrip("/") + "/", headers=headers,
                               timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def stream(messages: list[dict], sampling: dict, notify: Notify,
                     session: str | None = None) -> AsyncIterator[str | Usage]:
        body = {"messages": messages, "stream": True, "temperature": sampling.get("temperature"),
                "top_p": sampling.get("top_p"), "max_tokens": sampling.get("max_new_tokens"),
                "truncation": "auto", "stream_options": {"include_usage": True}}
        try:
            async with client.stream("POST", "v1/chat/completions", json=body,
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
            raise BackendError(f"cannot reach the backend at {backend_url} ({error.__class__.__name__}).") from error

    return stream


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
