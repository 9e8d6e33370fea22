"""Several models behind one application (issue 30): the API routes on `model`, lists every
model, refuses an unknown one in each protocol's shape, and a model that sleeps (Serve's
autoscaling to zero) wakes for its first request and goes back to sleep. Real Serve, tiny models:
tiny-duo serves tiny-chat (the default) and tiny-gpt2; tiny-sleepy serves tiny-awake and
tiny-asleep, which has no replica until asked."""

import asyncio
import time

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from backend.settings import deployment_name
from tests.helpers.processes import wait_for

HELLO = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def sdk(base_url: str, app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/{app}/v1", api_key="unused", max_retries=0)


def running_replicas(app: str, model: str) -> int:
    deployments = serve.status().applications[app].deployments
    return deployments[deployment_name(model)].replica_states.get("RUNNING", 0)


def until_asleep(app: str, model: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while running_replicas(app, model) and time.monotonic() < deadline:
        time.sleep(1)
    assert running_replicas(app, model) == 0, f"{model} kept its replica {timeout_s} s"


def test_models_lists_each_model_with_what_a_client_needs(http):
    listed = http.get("/tiny-duo/v1/models").json()["data"]
    assert [card["id"] for card in listed] == ["tiny-chat", "tiny-gpt2"]  # the default first
    for card in listed:
        assert card["loaded"] is True and card["quantization"] == "int4"
        assert card["context_length"] > 0 and card["owned_by"]
    # Each is its own model: tiny-gpt2's context is 256 tokens, tiny-chat's is not.
    assert [card["context_length"] for card in listed][1] == 256
    assert listed[0]["context_length"] != 256


def test_the_model_named_answers_and_none_named_is_the_default(base_url):
    client = sdk(base_url, "tiny-duo")
    named = {model: client.chat.completions.create(model=model, messages=HELLO, **GREEDY)
             for model in ("tiny-chat", "tiny-gpt2")}
    unnamed = client.chat.completions.create(model="", messages=HELLO, **GREEDY)
    assert {model: reply.model for model, reply in named.items()} == {"tiny-chat": "tiny-chat", "tiny-gpt2": "tiny-gpt2"}
    assert unnamed.model == "tiny-chat"
    assert unnamed.choices[0].message.content == named["tiny-chat"].choices[0].message.content
    # Two different models, two different replies (the same on a model of its own application).
    assert named["tiny-gpt2"].choices[0].message.content != named["tiny-chat"].choices[0].message.content
    alone = sdk(base_url, "tiny-gpt2").chat.completions.create(model="tiny-gpt2", messages=HELLO, **GREEDY)
    assert named["tiny-gpt2"].choices[0].message.content == alone.choices[0].message.content


def test_an_unknown_model_is_a_404_naming_the_served_ones_in_each_protocol(base_url, http):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk(base_url, "tiny-duo").chat.completions.create(model="gpt-4o", messages=HELLO, **GREEDY)
    error = raised.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'gpt-4o'" in error["message"] and "'tiny-chat'" in error["message"] and "'tiny-gpt2'" in error["message"]

    with pytest.raises(anthropic.NotFoundError) as raised:
        anthropic.Anthropic(base_url=f"{base_url}/tiny-duo", api_key="unused", max_retries=0).messages.create(
            model="claude-sonnet", max_tokens=8, messages=HELLO)
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "not_found_error"
    assert "'tiny-gpt2'" in raised.value.body["error"]["message"]

    tutorial = http.post("/tiny-duo/", params={"prompt": "Hi", "model": "nope"})
    assert tutorial.status_code == 404 and "'tiny-chat'" in tutorial.json()["error"]["message"]


def test_the_tutorial_routes_take_a_model(base_url, http):
    by_query = http.post("/tiny-duo/", params={"prompt": "Hello there", "model": "tiny-gpt2", "max_new_tokens": 12,
                                               "temperature": 0})
    alone = http.post("/tiny-gpt2/", params={"prompt": "Hello there", "max_new_tokens": 12, "temperature": 0})
    assert by_query.status_code == alone.status_code == 200
    assert by_query.text == alone.text

    async def socket(model: str) -> str:
        async with connect(base_url.replace("http://", "ws://") + f"/tiny-duo/?model={model}") as ws:
            await ws.send("Hello there")
            frames = []
            while (frame := await asyncio.wait_for(ws.recv(), 120)) != "<<Response Finished>>":
                frames.append(frame)
            return "".join(frames)

    assert asyncio.run(socket("tiny-gpt2"))  # the WebSocket's replies use the model's own defaults

    async def unknown() -> ConnectionClosed:
        async with connect(base_url.replace("http://", "ws://") + "/tiny-duo/?model=nope") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
            return closed.value

    closed = asyncio.run(unknown())
    assert closed.rcvd.code == 1008 and "'tiny-gpt2'" in closed.rcvd.reason


def test_metrics_carry_the_model(http, metrics_url):
    for model in ("tiny-chat", "tiny-gpt2"):
        assert http.post("/tiny-duo/v1/completions", json={"model": model, "prompt": "Once", "max_tokens": 4,
                                                           "temperature": 0}).status_code == 200

    def finished_by_model() -> dict[str, float]:
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
            for sample in family.samples:
                if sample.name == "ray_textbot_requests_finished_total" and sample.labels.get("application") == "tiny-duo":
                    key = (sample.labels.get("model"), sample.labels["deployment"])
                    counts[key] = counts.get(key, 0) + sample.value
        return counts

    # Ray exports a replica's metrics every few seconds.
    wait_for(lambda: len([n for n in finished_by_model().values() if n > 0]) >= 2, 60,
             "each model's finished replies in /metrics")
    counted = finished_by_model()
    assert {model for model, _ in counted} == {"tiny-chat", "tiny-gpt2"}
    assert all(deployment == deployment_name(model) for model, deployment in counted)


def test_a_sleeping_model_wakes_for_its_first_request_and_sleeps_again(base_url, http):
    """No replica until asked; listing the models does not wake it; its first request waits for
    a replica and gets an ordinary reply; 5 idle seconds later it has none again."""
    # Asleep (another test may have woken it: it sleeps again 5 idle seconds after).
    until_asleep("tiny-sleepy", "tiny-asleep")
    listed = {card["id"]: card for card in http.get("/tiny-sleepy/v1/models").json()["data"]}
    assert listed["tiny-awake"]["loaded"] is True and listed["tiny-asleep"]["loaded"] is False
    assert running_replicas("tiny-sleepy", "tiny-asleep") == 0, "listing the models woke the sleeping one"

    client = sdk(base_url, "tiny-sleepy")
    chunks = list(client.chat.completions.create(model="tiny-asleep", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and {chunk.model for chunk in chunks} == {"tiny-asleep"}
    assert chunks[-1].usage.completion_tokens == 12
    listed = {card["id"]: card for card in http.get("/tiny-sleepy/v1/models").json()["data"]}
    assert listed["tiny-asleep"]["loaded"] is True and listed["tiny-asleep"]["context_length"] > 0
    # The same reply as its twin's, which has been awake all along (the same tiny model).
    awake = client.chat.completions.create(model="tiny-awake", messages=HELLO, **GREEDY)
    assert awake.choices[0].message.content == text

    until_asleep("tiny-sleepy", "tiny-asleep")
    assert running_replicas("tiny-sleepy", "tiny-awake") == 1
    listed = {card["id"]: card for card in http.get("/tiny-sleepy/v1/models").json()["data"]}
    assert listed["tiny-asleep"]["loaded"] is False
    assert listed["tiny-asleep"]["context_length"] > 0  # as it was last seen


def test_the_shipped_config_serves_both_models_and_gemma_sleeps_until_asked(base_url, http):
    """deploy.yaml as `make run` serves it: SmolLM2 loaded from the start, Gemma 3 270M asleep
    until a request names it, then an ordinary reply through the openai SDK (a base model: the
    completions route; the chat route gives it a plain template)."""
    listed = {card["id"]: card for card in http.get("/api/v1/models").json()["data"]}
    assert list(listed) == ["SmolLM2-135M-Instruct", "gemma-3-270m"]
    assert listed["SmolLM2-135M-Instruct"]["loaded"] is True
    assert running_replicas("textbot", "gemma-3-270m") == 0 and listed["gemma-3-270m"]["loaded"] is False

    client = sdk(base_url, "api")
    completion = client.completions.create(model="gemma-3-270m", prompt="The capital of France is Paris. The capital of Germany is",
                                           max_tokens=8, temperature=0)
    assert completion.model == "gemma-3-270m" and completion.usage.completion_tokens > 0
    assert "Berlin" in completion.choices[0].text
    chat = client.chat.completions.create(model="gemma-3-270m", messages=HELLO, **GREEDY)
    assert chat.model == "gemma-3-270m" and chat.choices[0].message.content
    listed = {card["id"]: card for card in http.get("/api/v1/models").json()["data"]}
    assert listed["gemma-3-270m"]["loaded"] is True and listed["gemma-3-270m"]["engine"] == "textbot"
    assert listed["gemma-3-270m"]["context_length"] == 10752  # what its KV budget holds of its 32768
