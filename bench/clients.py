"""One streaming client per thing measured. Each is a function
`(prompt, max_tokens) -> async iterator of text pieces`, so one load generator
drives them all the same way."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import httpx

from ui.sources import openai_pieces, sse_lines

Stream = Callable[[str, int], AsyncIterator[str]]

GREEDY = {"temperature": 0.0, "top_p": 1.0}


def engine_client(engine) -> Stream:
    """(a) The engine in-process: the limit everything else is compared with."""
    from backend.protocol import ChatMessage, ResolvedSampling

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[str]:
        sampling = ResolvedSampling(max_new_tokens=max_tokens, **GREEDY)
        async for piece in engine.submit([ChatMessage(role="user", content=prompt)], sampling):
            yield piece

    return stream


def transformers_client(loaded) -> Stream:
    """(b) The tutorial's way: `model.generate` with a TextIteratorStreamer on a thread
    per request, no batching between requests."""
    from transformers import TextIteratorStreamer

    from backend.engine.prompt import encode_chat
    from backend.protocol import ChatMessage

    def generate(prompt: str, max_tokens: int) -> Iterator[str]:
        import torch

        ids = encode_chat(loaded.tokenizer, [ChatMessage(role="user", content=prompt)])
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                      streamer=streamer, pad_token_id=loaded.tokenizer.eos_token_id)
        thread = threading.Thread(target=loaded.model.generate, kwargs=kwargs)
        thread.start()
        yield from streamer
        thread.join()

    return lambda prompt, max_tokens: from_thread(lambda: generate(prompt, max_tokens))


def text_client(api_url: str, client: httpx.AsyncClient) -> Stream:
    """(c) The tutorial's streaming endpoint, POST /api/?prompt=..."""

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[str]:
        params = {"prompt": prompt, "max_new_tokens": max_tokens, "temperature": 0}
        async with client.stream("POST", f"{api_url}/", params=params) as response:
            response.raise_for_status()
            async for piece in response.aiter_text():
                yield piece

    return stream


def openai_client(api_url: str, client: httpx.AsyncClient, model: str | None = None) -> Stream:
    """(d) The OpenAI-compatible chat completions, streamed as Server-Sent Events."""

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[str]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "stream": True, **GREEDY} | ({"model": model} if model else {})
        async with client.stream("POST", f"{api_url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for piece in openai_pieces(sse_lines(response)):
                yield piece

    return stream


def completions_client(api_url: str, client: httpx.AsyncClient, encode: Callable[[str], list[int]]) -> Stream:
    """(f) for a model without a chat template (a base model): OpenAI's text completions
    (POST /v1/completions, streamed), the prompt sent as the token ids `encode` gives, so
    the peer reads exactly the tokens Textbot's chat route builds for that model."""

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[str]:
        body = {"prompt": encode(prompt), "max_tokens": max_tokens, "stream": True, **GREEDY}
        async with client.stream("POST", f"{api_url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in sse_lines(response):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", chunk["error"]))
                for choice in chunk.get("choices", ()):
                    if piece := choice.get("text"):
                        yield piece

    return stream


def reply_text(output) -> str:
    """An update of the page's /chat: the reply so far (a string), or at the end the reply and
    its figures note (a list of messages)."""
    if isinstance(output, str):
        return output
    return next((m["content"] for m in output or () if not (m.get("metadata") or {}).get("title")), "")


def page_client(page_url: str, client: httpx.AsyncClient, model: str) -> Stream:
    """(e) The chat page, as a browser tab talks to it: each chat is a Gradio session of its
    own (as each tab is) that joins the page's queue for the /chat event
    (POST gradio_api/queue/join) and reads the session's Server-Sent Events
    (GET gradio_api/queue/data), applying Gradio's diffs to rebuild the reply. The page
    replica does the same work as for a browser's chat (queue, chat function, a diffed SSE
    message per update); the client reads each message as it arrives, as a browser's
    EventSource does, on the benchmark's event loop like the other HTTP clients.

    Not gradio_client: it hands each SSE message to its job by polling (every 50 ms, and the
    job's iterator every 1 ms, on a thread per chat), which added up to 50 ms to each update
    and, at 8 chats, took a third of a core beside the page replica on this 2-core machine."""
    from gradio_client.utils import apply_diff

    root = page_url.rstrip("/") + "/"
    config = httpx.get(root + "config", timeout=30).json()
    api = root + config.get("api_prefix", "/gradio_api").strip("/") + "/"
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[str]:
        session = uuid.uuid4().hex[:11]
        # The /chat event's inputs: message, its history (a State: None), system prompt,
        # temperature, top-p, max new tokens, and the model picker's value.
        joined = await client.post(api + "queue/join", json={
            "data": [prompt, None, "", GREEDY["temperature"], GREEDY["top_p"], max_tokens, model],
            "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
        joined.raise_for_status()
        event_id = joined.json()["event_id"]
        output, sent = None, ""
        async with client.stream("GET", api + "queue/data", params={"session_hash": session}) as response:
            response.raise_for_status()
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") != event_id:
                    continue
                if message["msg"] == "process_generating":
                    data = message["output"]["data"][0]
                    output = data if output is None else apply_diff(output, data)
                elif message["msg"] == "process_completed":
                    if not message.get("success", True):
                        raise RuntimeError(f"the chat page reported an error: {message['output'].get('error')}")
                    output = message["output"]["data"][0]
                else:
                    continue
                text = reply_text(output)
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
                if message["msg"] == "process_completed":
                    return
        raise RuntimeError("the chat page's event stream ended before the reply did")

    return stream


async def from_thread(make_iterator: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Drive a blocking iterator on its own thread; hand its items to the event loop as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in make_iterator():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except Exception as error:  # noqa: BLE001 - re-raised on the consumer's side
            loop.call_soon_threadsafe(queue.put_nowait, error)
        loop.call_soon_threadsafe(queue.put_nowait, done)

    threading.Thread(target=pump, daemon=True).start()
    while (item := await queue.get()) is not done:
        if isinstance(item, Exception):
            raise item
        yield item
