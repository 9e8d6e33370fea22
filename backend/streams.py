"""Several async streams read as one, as their items arrive: the replies to one prompt (`n`)
in a Textbot replica, the prompts of one completions request in the ingress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

_DONE = object()


async def merge(streams: list[AsyncIterable]) -> AsyncIterator:
    """Items of every stream, interleaved in arrival order. The first error ends the merge
    and is raised; leaving the merge early closes every stream (each cancels its work)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterable) -> None:
        try:
            async for item in stream:
                await arrived.put((item, None))
        except Exception as exc:  # noqa: BLE001 - travels to the reader, which raises it
            await arrived.put((None, exc))
        await arrived.put((_DONE, None))

    pumps = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(pumps)
        while running:
            item, error = await arrived.get()
            if error is not None:
                raise error
            if item is _DONE:
                running -= 1
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
