"""The tutorial's WebSocket chat, with the `websockets` package as the client (tiny models, greedy)."""

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

END = "<<Response Finished>>"


def ws_url(base_url: str, app: str) -> str:
    return base_url.replace("http://", "ws://") + f"/{app}/"


async def ask(ws, message: str) -> list[str]:
    await ws.send(message)
    frames = []
    while (frame := await asyncio.wait_for(ws.recv(), 120)) != END:
        frames.append(frame)
    return frames


def test_two_turn_conversation_keeps_its_context(base_url, http):
    async def chat():
        async with connect(ws_url(base_url, "tiny-chat")) as ws:
            return await ask(ws, "Hello, I am Ada."), await ask(ws, "What is my name?")

    first, second = asyncio.run(chat())
    assert len(first) > 1 and len(second) > 1

    def backend(messages):
        return http.post("/tiny-chat/v1/chat/completions", json={"messages": messages}).json()[
            "choices"][0]["message"]["content"]

    assert "".join(first) == backend([{"role": "user", "content": "Hello, I am Ada."}])
    assert "".join(second) == backend([{"role": "user", "content": "Hello, I am Ada."},
                                       {"role": "assistant", "content": "".join(first)},
                                       {"role": "user", "content": "What is my name?"}])


def test_long_conversation_drops_oldest_turns_and_keeps_going(base_url):
    # tiny-gpt2's context is 256 tokens: a few of these turns overflow it.
    async def chat():
        async with connect(ws_url(base_url, "tiny-gpt2")) as ws:
            return [await ask(ws, f"Turn {i}: " + "tell me more about the robot " * 6) for i in range(8)]

    replies = asyncio.run(chat())
    assert all(len(reply) > 0 for reply in replies)


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (b"\x00\x01binary", 1003, "text frames"),
        ("   ", 1007, "empty"),
        ("x" * 33_000, 1009, "limit is 32000"),
    ],
)
def test_bad_frames_close_with_a_code_and_reason(base_url, frame, code, reason):
    async def send_bad():
        async with connect(ws_url(base_url, "tiny-chat"), max_size=None) as ws:
            await ws.send(frame)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
            return closed.value.rcvd

    close = asyncio.run(send_bad())
    assert close.code == code
    assert reason in close.reason
