"""Stop means stop: disconnects cancel generation; overload is refused cleanly; caps hold.
Against the real served stack (tiny models)."""

import asyncio
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers.serving import model_handle

LONG = 4000  # tokens: tens of seconds of decoding if nothing stops it
HELLO = [{"role": "user", "content": "Tell me everything."}]


def in_flight(app: str) -> int:
    stats = model_handle(app).stats.remote().result(timeout_s=30)
    return stats["running"] + stats["waiting"]


def seconds_until_idle(app: str, timeout_s: float = 10) -> float:
    started = time.monotonic()
    while in_flight(app) and time.monotonic() - started < timeout_s:
        time.sleep(0.02)
    return time.monotonic() - started


async def abandon_after_first_piece(client: httpx.AsyncClient, method: str, path: str, **kwargs) -> None:
    async with client.stream(method, path, **kwargs) as response:
        assert response.status_code == 200
        async for _ in response.aiter_raw():
            return  # leaving the block closes the connection mid-reply


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"method": "POST", "path": "/tiny-chat/", "params": {"prompt": "Go on", "max_new_tokens": LONG}},
        {"method": "POST", "path": "/tiny-chat/v1/chat/completions",
         "json": {"messages": HELLO, "max_tokens": LONG, "stream": True}},
    ],
    ids=["text-stream", "sse"],
)
def test_disconnect_stops_the_generation(base_url, request_kwargs):
    async def abandon():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            await asyncio.gather(*(abandon_after_first_piece(client, **request_kwargs) for _ in range(2)))

    asyncio.run(abandon())
    took = seconds_until_idle("tiny-chat")
    print(f"disconnect -> no generation in flight: {took:.3f} s")
    assert in_flight("tiny-chat") == 0
    assert took < 5


def test_websocket_close_stops_the_generation(base_url):
    async def abandon():
        url = base_url.replace("http://", "ws://") + "/tiny-chat/"
        async with connect(url) as ws:
            await ws.send("Tell me a very long story " * 40)
            await ws.recv()

    asyncio.run(abandon())
    assert seconds_until_idle("tiny-chat") < 5
    assert in_flight("tiny-chat") == 0


def test_abandoned_streams_leave_the_cores_to_new_ones(base_url):
    """Black box: if abandoned replies kept decoding, they would hold tiny-busy's only
    slot for tens of seconds and a new reply would wait behind them."""
    body = {"messages": HELLO, "max_tokens": 200, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=300) as client:
        started = time.monotonic()
        assert client.post("/tiny-busy/v1/chat/completions", json=body).status_code == 200
        baseline = time.monotonic() - started

    async def abandon():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            for _ in range(3):
                await abandon_after_first_piece(client, "POST", "/tiny-busy/", params={
                    "prompt": "Go on", "max_new_tokens": LONG})

    asyncio.run(abandon())
    with httpx.Client(base_url=base_url, timeout=300) as client:
        started = time.monotonic()
        assert client.post("/tiny-busy/v1/chat/completions", json=body).status_code == 200
        after = time.monotonic() - started
    print(f"200-token reply: {baseline:.2f} s before, {after:.2f} s after 3 abandoned streams")
    # Three uncancelled 4000-token replies ahead in the queue would take ~60x the baseline.
    assert after < 5 * baseline + 2


def test_forty_simultaneous_requests_are_served_in_full_or_refused_cleanly(base_url):
    body = {"messages": HELLO, "max_tokens": 32, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/tiny-busy/v1/chat/completions", json=body)
                                          for _ in range(40)))

    responses = asyncio.run(burst())
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    print(f"40 at once: {len(served)} served, {len(refused)} refused")
    assert len(served) + len(refused) == 40
    assert served and refused
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in served)
    assert len({r.json()["choices"][0]["message"]["content"] for r in served}) == 1
    for response in refused:
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "overloaded"
    assert in_flight("tiny-busy") == 0


def test_overloaded_websocket_closes_with_try_again_later(base_url):
    async def crowd():
        url = base_url.replace("http://", "ws://") + "/tiny-busy/"
        sockets = [await connect(url) for _ in range(8)]
        async def first_frame_or_close(ws):
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as closed:
                return closed.rcvd
            except TimeoutError:  # still waiting for a slot: accepted, not refused
                return None

        try:
            for ws in sockets:  # all eight ask at once ...
                await ws.send("Tell me a very long story " * 40)
            # ... and each gets either its first piece or a close
            return await asyncio.gather(*map(first_frame_or_close, sockets))
        finally:
            for ws in sockets:
                await ws.close()

    closes = [c for c in asyncio.run(crowd()) if c is not None]
    assert closes, "with one slot and four waiting places, some of eight sockets must be refused"
    assert all(c.code == 1013 and "Try again" in c.reason for c in closes)


def test_wall_clock_cap_ends_a_long_reply(http):
    response = http.post("/tiny-capped/v1/chat/completions", json={"messages": HELLO, "max_tokens": LONG})
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < LONG
