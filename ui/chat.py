"""The chat function behind the page. It needs only a stream source: something
that turns chat messages and sampling parameters into an async stream of text
pieces. Whether that is a DeploymentHandle or an HTTP client is the host's choice.
"""

from collections.abc import AsyncIterator, Callable

import gradio as gr

# (messages, sampling, notify, session) -> text pieces; `notify` shows the user a side note,
# `session` names the conversation.
StreamSource = Callable[[list[dict], dict, Callable[[str], None], str | None], AsyncIterator[str]]


def text_of(content) -> str:
    """Gradio 6 message content: a string (gradio_client) or a list of parts (the browser)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def to_messages(message, history: list[dict], system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    for turn in history:
        if turn.get("role") in ("user", "assistant") and (text := text_of(turn.get("content"))):
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


def make_chat_fn(source: StreamSource):
    async def chat(message, history, system_prompt, temperature, top_p, max_new_tokens):
        if not text_of(message).strip():
            raise gr.Error("Type a message first.")
        sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": int(max_new_tokens)}
        reply = ""
        try:
            messages = to_messages(message, history, system_prompt)
            async for piece in source(messages, sampling, gr.Warning, browser_session()):
                reply += piece
                yield reply
        except gr.Error:
            raise
        except Exception as error:  # the backend's reason, shown in the page
            raise gr.Error(f"The model could not answer: {reason(error)}") from error

    return chat
