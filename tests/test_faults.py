"""Faults: a model that fails mid-generation, and a replica killed mid-stream."""

import asyncio
import contextlib
import glob
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers.processes import wait_for
from tests.helpers.serving import model_deployment

HELLO = [{"role": "user", "content": "Hello"}]
SAMPLED = {"temperature": 1.0, "max_tokens": 8}  # sampling from NaN logits raises


def test_failing_generation_is_an_error_on_every_route(http, base_url):
    response = http.post("/tiny-broken/v1/chat/completions", json={"messages": HELLO, **SAMPLED})
    assert response.status_code == 500
    assert "failed while generating" in response.json()["error"]["message"]

    with http.stream("POST", "/tiny-broken/v1/chat/completions",
                     json={"messages": HELLO, **SAMPLED, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line]
    assert '"error"' in events[-1] and "failed while generating" in events[-1]

    response = http.post("/tiny-broken/", params={"prompt": "Hi", "temperature": 1.0})
    assert response.status_code == 500
    assert "failed while generating" in response.json()["error"]["message"]


def test_failing_generation_closes_the_websocket_with_1011(base_url):
    async def chat():
        async with connect(base_url.replace("http://", "ws://") + "/tiny-broken/") as ws:
            await ws.send("Hello")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
            return closed.value.rcvd

    close = asyncio.run(chat())
    assert close.code == 1011
    assert "failed while generating" in close.reason


def replica_actor(app: str):
    """The application's one model replica, as an actor handle for ray.kill (once a replica
    killed before is gone from Ray's list of named actors)."""
    [replica] = wait_for(lambda: len(found := replicas(app)) == 1 and found, 60, f"one replica of {app}")
    return ray.get_actor(replica["name"], namespace=replica["namespace"])


def kill_replica(app: str) -> None:
    ray.kill(replica_actor(app), no_restart=True)


def next_request_succeeds(http, app: str, timeout_s: float = 120) -> bool:
    """Serve replaces the dead replica; poll until a reply comes back."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http.post(f"/{app}/", params={"prompt": "Hi", "max_new_tokens": 4}).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


async def read_until_failure(open_stream) -> tuple[str, float]:
    """Open a long stream, kill the replica after the first piece, time the client's terminal error.
    The replica is looked up before the stream opens: asking Serve's controller which replica it is
    took longer than the whole 4000-token reply on a busy CI machine, which then ended untouched."""
    victim = replica_actor("tiny-victim")
    async with open_stream() as pieces:
        await anext(pieces)
        ray.kill(victim, no_restart=True)
        killed = time.monotonic()
        try:
            async for piece in pieces:
                if piece.startswith('data: {"error"'):
                    outcome = "SSE error event"
                    break
            else:
                outcome = "ended"
        except ConnectionClosed as closed:
            outcome = f"WebSocket close {closed.rcvd.code if closed.rcvd else 'without a close frame'}"
        except Exception as error:  # noqa: BLE001 - which error is what the test reports
            outcome = type(error).__name__
        return outcome, time.monotonic() - killed


def http_stream(base_url, sse: bool, **kwargs):
    @contextlib.asynccontextmanager
    async def open_stream():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            async with client.stream(**kwargs) as response:
                if sse:
                    # Skip SSE's blank separators and its opening role chunk, which the ingress
                    # sends before the model replica has the request: wait for generated text.
                    yield (line async for line in response.aiter_lines() if line and '"role"' not in line)
                else:
                    # Plain text as it arrives: a reply may hold no line break until its end.
                    yield (text async for text in response.aiter_text() if text)
    return open_stream


# What each protocol's client sees when the model replica dies mid-reply: the
# ingress survives it, so each gets a terminal error in its own terms.
EXPECTED_OUTCOME = {
    "text": "RemoteProtocolError",  # the chunked body is cut before its end: an incomplete reply
    "sse": "SSE error event",
    "websocket": "WebSocket close 1011",
}


@pytest.mark.parametrize("route", EXPECTED_OUTCOME)
def test_replica_killed_mid_stream_gives_a_terminal_error_then_recovers(base_url, http, route):
    if route == "text":
        opener = http_stream(base_url, sse=False, method="POST", url="/tiny-victim/",
                             params={"prompt": "Go on", "max_new_tokens": 4000})
    elif route == "sse":
        opener = http_stream(base_url, sse=True, method="POST", url="/tiny-victim/v1/chat/completions",
                             json={"messages": HELLO, "max_tokens": 4000, "stream": True})
    else:
        @contextlib.asynccontextmanager
        async def opener():
            async with connect(base_url.replace("http://", "ws://") + "/tiny-victim/") as ws:
                await ws.send("Tell me a long story " * 30)

                async def frames():
                    while True:
                        yield await ws.recv()
                yield frames()

    outcome, seconds = asyncio.run(read_until_failure(opener))
    print(f"{route}: replica killed -> client saw {outcome} after {seconds:.2f} s")
    assert outcome == EXPECTED_OUTCOME[route]
    assert seconds < 5
    assert next_request_succeeds(http, "tiny-victim")


def test_health_reflects_a_lost_model_replica_until_serve_replaces_it(http):
    assert http.get("/tiny-victim/health").status_code == 200
    [victim] = replicas("tiny-victim")
    kill_replica("tiny-victim")
    # ray.kill returns before the replica is gone: wait until it is, so no answer can come from it.
    wait_for(lambda: victim["name"] not in [r["name"] for r in replicas("tiny-victim")], 60,
             "the killed replica to be gone")
    health = http.get("/tiny-victim/health")
    # Serve holds the call for a replica: one that replaces the victim within /health's 5 s
    # wait answers it; otherwise /health says why it cannot.
    print("/health after the kill:", health.status_code, health.text)
    if health.status_code == 200:
        assert [r for r in replicas("tiny-victim") if r["name"] != victim["name"]], "200 with no replica"
    else:
        assert health.status_code == 503
        assert "No model replica is ready" in health.json()["error"]["message"]
        assert health.headers["retry-after"] == "5"
    assert next_request_succeeds(http, "tiny-victim")
    assert http.get("/tiny-victim/health").json() == {"status": "ok", "model": "tiny-chat"}


def test_serve_replaces_a_replica_whose_decode_loop_is_wedged(http, base_url, serve_logs):
    """tiny-slow reads a 7700-token prompt in one step of 10 s or more, against a stall
    limit of 0.5 s: to its health check, a wedged loop. /health says so, Serve's controller
    sees check_health fail and replaces the replica, and the new one serves."""
    [wedged_replica] = [r["name"] for r in replicas("tiny-slow")]
    prompt = [{"role": "user", "content": "Once upon a time a small robot learned to tell stories. " * 240}]

    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(httpx.post, f"{base_url}/tiny-slow/v1/chat/completions", timeout=120,
                            json={"messages": prompt, "max_tokens": 1})
        health = wait_for(lambda: (r := http.get("/tiny-slow/health")).status_code == 503 and r.json(),
                          60, "/health to report the wedged loop")
        replaced = wait_for(lambda: (names := [r["name"] for r in replicas("tiny-slow")])
                            and wedged_replica not in names and names, 120, "Serve to replace the replica")
        stuck_status = stuck.result().status_code

    print("health while wedged:", health["error"]["message"], "| replaced by:", replaced)
    assert "The decode loop has finished no step for" in health["error"]["message"]
    replica_id = wedged_replica.rsplit("#", 1)[1]
    verdicts = [line for path in glob.glob(f"{serve_logs}/controller_*.log")
                for line in open(path, errors="replace") if replica_id in line and "failed the health check" in line]
    assert verdicts, f"no health-check failure of replica {replica_id} in the controller's log"
    assert stuck_status == 503  # its replica was replaced before the first token: try again
    assert next_request_succeeds(http, "tiny-slow")
    assert http.get("/tiny-slow/health").status_code == 200


def replicas(app: str) -> list[dict]:
    """The application's model replicas (Serve's named actors): name and namespace."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#{model_deployment(app)}#")]

