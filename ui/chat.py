"""The chat function behind the page. It needs only a Backend: the served models
(which one is the default, which are loaded), and a stream source that turns chat
messages, sampling parameters and a model's name into an async stream of text pieces
ending with the reply's Usage. Whether that is a DeploymentHandle or an HTTP client is
the host's choice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import gradio as gr

# (messages, sampling, notify, session, model) -> text pieces, then one Usage; `notify` shows
# the user a side note, `session` names the conversation, `model` the served model that answers
# (None: the default).
StreamSource = Callable[[list[dict], dict, Callable[[str], None], str | None, str | None],
                        AsyncIterator["str | Usage"]]


class Backend(Protocol):
    """Where the page's replies come from: Textbot's models, through Serve handles or over HTTP."""

    stream: StreamSource

    async def models(self) -> dict[str, bool]:
        """Each served model by name, the default first, and whether a replica of it is running
        (a sleeping model has none until its first request starts one)."""


# At most one update to the browser per chat in this many seconds. Each update makes Gradio
# postprocess and diff the whole conversation and send an SSE message: one per token costs
# the page replica's CPU what the other routes spend on nothing (docs/BENCHMARKS.md, the chat
# page under load).
UPDATE_INTERVAL_S = 0.04

# The marker of the line of figures under a reply: a Gradio "thought" note, not the model's words.
# Its metadata id is `textbot-figures:<request id>:<model>`: Gradio keeps only its own metadata
# keys, and the id travels with the conversation into the browser's storage, so the model that
# wrote a reply is still known when the conversation is opened again (conversation_model).
FIGURES_ID = "textbot-figures"


@dataclass(frozen=True)
class Usage:
    """What the backend counted for one reply, and the request id its log line carries."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    request_id: str | None = None


def text_of(content) -> str:
    """Gradio 6 message content: a string (gradio_client) or a list of parts (the browser)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def is_note(turn: dict) -> bool:
    """A message the page added (the figures under a reply), which the model never said."""
    metadata = turn.get("metadata") or {}
    return bool(metadata.get("title"))


def to_messages(message, history: list[dict], system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    for turn in history:
        if turn.get("role") in ("user", "assistant") and not is_note(turn) and (text := text_of(turn.get("content"))):
            messages.append({"role": turn["role"], "content": text})
    messages.append({"role": "user", "content": text_of(message)})
    return messages


def reason(error: BaseException) -> str:
    """The sentence meant for a person, without Ray's wrapping or a traceback."""
    cause = getattr(error, "cause", None) or error
    message = getattr(cause, "message", None) or (cause.args[0] if cause.args else "")
    return str(message).strip() or cause.__class__.__name__


def browser_session() -> str | None:
    """The page's Gradio session (one per browser tab): its conversation's key, so its turns
    reach the model replica that holds its prefix cache. ChatInterface passes no gr.Request
    to a streaming chat function; the event's request is in Gradio's context, where
    ChatInterface itself reads it for its examples."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return getattr(request, "session_hash", None)


def figures_line(model: str, usage: Usage, first_s: float | None, first_at: float | None, end_at: float) -> str:
    """`tiny-gpt2 · 42 tokens · 0.31 s to first token · 55.2 tokens/s · 12 of 30 prompt tokens cached`.
    Tokens per second is the decode rate after the first token (what llama.cpp's and LM
    Studio's pages show), so a slow first token does not hide a fast reply."""
    parts = [model, f"{usage.completion_tokens} token{'s' if usage.completion_tokens != 1 else ''}"]
    if first_s is not None:
        parts.append(f"{first_s:.2f} s to first token")
    if first_at is not None and usage.completion_tokens > 1 and end_at > first_at:
        parts.append(f"{(usage.completion_tokens - 1) / (end_at - first_at):.1f} tokens/s")
    parts.append(f"{usage.cached_tokens} of {usage.prompt_tokens} prompt tokens cached")
    return " · ".join(parts)


async def paced(pieces: AsyncIterator, interval_s: float) -> AsyncIterator[list]:
    """Batches of what `pieces` yields, at most one batch per `interval_s`: the first piece
    goes at once, later ones wait for the interval (never for the next piece). A task reads
    the source, so a slow token does not hold back text already here; closing this
    generator (Stop, a closed tab) cancels that task, which cancels the source."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump():
        try:
            async for piece in pieces:
                queue.put_nowait(piece)
            queue.put_nowait(end)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised on the reader's side
            queue.put_nowait(error)

    reader = asyncio.create_task(pump())
    try:
        sent_at = float("-inf")
        while True:
            batch = [await queue.get()]
            wait = sent_at + interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = next((i for i, item in enumerate(batch) if item is end or isinstance(item, BaseException)), None)
            if finished is not None:
                if batch[:finished]:
                    yield batch[:finished]
                if isinstance(batch[finished], BaseException):
                    raise batch[finished]
                return
            sent_at = time.monotonic()
            yield batch
    finally:
        reader.cancel()
        try:
            await reader
        except BaseException:  # noqa: BLE001 - cancelled on purpose; its error was reported
            pass


def loading_notice(model: str) -> str:
    return f"{model} is loading: its first reply waits for it to start."


def unserved_model(asked: str, served) -> str:
    return f"The model {asked!r} is not served here; pick one of {', '.join(served)}."


class ServedNames:
    """The served models' names as the page last heard them (the default first): asked of the
    backend once, and again only for a name it did not list. Not before every reply: that
    round trip sat in front of every first token (docs/BENCHMARKS.md, issue 30)."""

    def __init__(self, backend: Backend):
        self.backend, self.names = backend, []

    async def answering(self, asked: str | None) -> str:
        """The served model a message goes to: the one picked, else the default."""
        if not self.names or (asked and asked not in self.names):
            try:
                self.names = list(await self.backend.models())
            except Exception as error:  # the backend unreachable: no model can answer either
                raise gr.Error(f"The model could not answer: {reason(error)}") from error
        name = asked or self.names[0]
        if not isinstance(name, str) or name not in self.names:  # a typed value, or an API caller's
            raise gr.Error(unserved_model(name, self.names))
        return name


# A reply with no text this long after sending asks whether its model is asleep (its replica
# starting), to say so: a model that is up answers sooner, so it is never asked for.
LOADING_CHECK_AFTER_S = 0.5


async def say_if_loading(backend: Backend, model: str, answered: asyncio.Event) -> None:
    """Tell the user that `model` is loading, if the reply has not begun within
    LOADING_CHECK_AFTER_S and the backend says no replica of it runs."""
    try:
        await asyncio.wait_for(answered.wait(), LOADING_CHECK_AFTER_S)
        return
    except TimeoutError:
        pass
    try:
        loaded = (await backend.models()).get(model, True)
    except Exception:  # noqa: BLE001 - only a hint; the reply itself says what went wrong
        return
    if not loaded and not answered.is_set():
        gr.Info(loading_notice(model))


def figures_id(request_id: str | None, model: str) -> str:
    return f"{FIGURES_ID}:{request_id or ''}:{model}"


def figures_fields(turn: dict) -> tuple[str | None, str | None] | None:
    """(request id, model) of a figures note; None for any other message. Notes saved before
    the page named models carry no model."""
    marker = str((turn.get("metadata") or {}).get("id", ""))
    if not marker.startswith(FIGURES_ID + ":"):
        return None
    request_id, _, model = marker.removeprefix(FIGURES_ID + ":").partition(":")
    return request_id or None, model or None


def conversation_model(conversation: list[dict]) -> str | None:
    """The model that wrote the conversation's last finished reply, as its figures note says."""
    for turn in reversed(conversation or []):
        if (fields := figures_fields(turn)) and fields[1]:
            return fields[1]
    return None


def make_chat_fn(backend: Backend, update_interval_s: float = UPDATE_INTERVAL_S):
    # `model` last and optional: API callers that predate the model picker still get the default.
    served = ServedNames(backend)

    async def chat(message, history, system_prompt, temperature, top_p, max_new_tokens, model=None):
        if not text_of(message).strip():
            raise gr.Error("Type a message first.")
        name = await served.answering(model)
        sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": int(max_new_tokens)}
        reply, usage = "", None
        started = time.monotonic()
        first_at = None
        answered = asyncio.Event()
        # A task of this event's, so its notice reaches this chat (it copies the event's context).
        loading_check = asyncio.create_task(say_if_loading(backend, name, answered))
        try:
            messages = to_messages(message, history, system_prompt)
            pieces = backend.stream(messages, sampling, gr.Warning, browser_session(), name)
            async for batch in paced(pieces, update_interval_s):
                text = "".join(item for item in batch if isinstance(item, str))
                usage = next((item for item in batch if isinstance(item, Usage)), usage)
                if text:
                    first_at = first_at or time.monotonic()
                    answered.set()
                    reply += text
                    yield reply
        except gr.Error:
            raise
        except Exception as error:  # the backend's reason, shown in the page
            raise gr.Error(f"The model could not answer: {reason(error)}") from error
        finally:
            answered.set()
            loading_check.cancel()
        if usage is not None:
            # The finished reply, then a note under it with its figures: Gradio's message
            # metadata, so it renders as a small closed box, not as the model's words.
            line = figures_line(name, usage, first_at and first_at - started, first_at, time.monotonic())
            yield [gr.ChatMessage(role="assistant", content=reply),
                   gr.ChatMessage(role="assistant", content="",
                                  metadata={"title": line, "id": figures_id(usage.request_id, name),
                                            "status": "done"})]

    return chat


def reply_request_id(history: list[dict], index) -> str | None:
    """The request id of the reply at `index` (a like's), from the figures note under it."""
    position = index[0] if isinstance(index, (list, tuple)) else index
    for turn in history[position:]:
        if turn.get("role") == "user":
            break
        if fields := figures_fields(turn):
            return fields[0]
    return None


def make_feedback_fn(record: Callable[[str, str | None], None]):
    """The Chatbot's like event: `record(value, request_id)` with value "like" or "dislike"."""

    def feedback(history: list[dict], data: gr.LikeData):
        value = "like" if data.liked is True else "dislike" if data.liked is False else str(data.liked).lower()
        if value not in ("like", "dislike"):
            return  # an undone like/dislike: nothing to count
        try:
            record(value, reply_request_id(history or [], data.index))
        except Exception as error:  # the operator's counter failing must not break the page
            raise gr.Error(f"Could not record your feedback: {reason(error)}") from error

    return feedback
