"""One streaming client per thing measured. Each is a function
`(prompt, max_tokens) -> async iterator of text pieces`, so one load generator
drives them all the same way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import httpx

from ui.sources import openai_pieces

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
            async for piece in openai_pieces(response.aiter_lines()):
                yield piece

    return stream


def gradio_client(page_url: str) -> Stream:
    """(e) The chat page through gradio_client, as a browser's requests would go."""
    from gradio_client import Client

    client = Client(page_url, verbose=False)

    def chat(prompt: str, max_tokens: int) -> Iterator[str]:
        job = client.submit(prompt, "", 0.0, 1.0, max_tokens, api_name="/chat")
        sent = ""
        for partial in job:  # each update is the whole reply so far; the last, it and its figures
            text = partial if isinstance(partial, str) else next(
                (m["content"] for m in partial if not (m.get("metadata") or {}).get("title")), "")
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        if not job.status().success:
            raise RuntimeError("the chat page reported an error")

    return lambda prompt, max_tokens: from_thread(lambda: chat(prompt, max_tokens))


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
