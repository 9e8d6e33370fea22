"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) through the anthropic
SDK, unchanged: `messages.create`, `messages.stream`, `messages.parse` and `messages.count_tokens`
against the real stack (the tiny chat model, greedy; the default model for one structured-output and
tool case), and one case through LangChain's ChatAnthropic.

The current SDK no longer takes `temperature`, `top_p` and `top_k` as arguments; older SDKs and
other clients still send them, so the tests send them as those do, in the body (`extra_body`).
"""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import httpx
import jsonschema
import pytest
from anthropic import Anthropic
from openai import OpenAI
from pydantic import BaseModel, ConfigDict

from tests.conftest import API_KEY

MODEL = "tiny-chat"
BRIEF = "You are brief."
HELLO = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0}
STRUCTURED_BUDGET = 200
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}
WEATHER_TOOL = {"name": "get_weather", "description": "The weather forecast for a city.", "input_schema": CITY}


class Verdict(BaseModel):
    """The SDK moves numeric bounds into descriptions (Anthropic's grammar takes none), so this
    schema bounds its values with enums only."""

    model_config = ConfigDict(extra="forbid")
    mood: Literal["happy", "sad", "neutral"]
    confident: bool
    stars: Literal[1, 2, 3, 4, 5]


@pytest.fixture
def client(base_url) -> Anthropic:
    return Anthropic(base_url=f"{base_url}/{MODEL}", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def openai_client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/{MODEL}/v1", api_key="unused", max_retries=0, timeout=120)


def sent(blocks, how: str) -> list:
    """An earlier reply's blocks as a client sends them back: the SDK's objects, or their model_dump()."""
    return list(blocks) if how == "objects" else [block.model_dump() for block in blocks]


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_system_and_messages_give_the_chat_completion_reply_with_usage(client, openai_client):
    message = client.messages.create(model=MODEL, max_tokens=12, system=BRIEF, messages=HELLO, extra_body=GREEDY)
    chat = openai_client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                                 messages=[{"role": "system", "content": BRIEF}, *HELLO])

    assert text_of(message) == chat.choices[0].message.content
    assert (message.type, message.role, message.model, message.stop_reason) == \
        ("message", "assistant", MODEL, "max_tokens")
    assert message.id.startswith("msg_")
    usage = message.usage
    # Anthropic counts the prompt's cached and uncached tokens apart.
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == 12 and usage.cache_creation_input_tokens == 0


def test_the_repeated_prompt_is_read_from_the_prefix_cache(client):
    prompt = [{"role": "user", "content": "Tell me about robots, please."}]
    client.messages.create(model=MODEL, max_tokens=4, messages=prompt, extra_body=GREEDY)
    again = client.messages.create(model=MODEL, max_tokens=4, messages=prompt, extra_body=GREEDY)
    assert again.usage.cache_read_input_tokens > 0 and again.usage.input_tokens >= 1


def test_stream_events_parse_and_add_up_to_the_reply(client):
    whole = client.messages.create(model=MODEL, max_tokens=12, messages=HELLO, extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=12, messages=HELLO, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()

    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") > 1
    assert text_of(final) == text_of(whole)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_stop_sequences_end_the_reply_before_them(client):
    whole = text_of(client.messages.create(model=MODEL, max_tokens=12, messages=HELLO, extra_body=GREEDY))
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut = client.messages.create(model=MODEL, max_tokens=12, messages=HELLO, stop_sequences=[stop],
                                 extra_body=GREEDY)
    assert text_of(cut) == whole[:whole.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    with client.messages.stream(model=MODEL, max_tokens=12, messages=HELLO, stop_sequences=["never said", stop],
                                extra_body=GREEDY) as stream:
        [delta] = [event.delta for event in stream if event.type == "message_delta"]
        streamed = stream.get_final_message()
    assert (delta.stop_reason, delta.stop_sequence) == ("stop_sequence", stop)
    assert text_of(streamed) == text_of(cut) and streamed.stop_sequence == stop


def test_top_k_of_one_is_greedy_at_any_temperature(client):
    greedy = client.messages.create(model=MODEL, max_tokens=12, messages=HELLO, extra_body=GREEDY)
    top_one = client.messages.create(model=MODEL, max_tokens=12, messages=HELLO,
                                     extra_body={"temperature": 1.0, "top_k": 1, "top_p": 0.9})
    assert text_of(top_one) == text_of(greedy)


def test_count_tokens_counts_the_prompt_the_model_reads(client):
    options = dict(model=MODEL, system=BRIEF, messages=HELLO, tools=[WEATHER_TOOL])
    counted = client.messages.count_tokens(**options)
    message = client.messages.create(max_tokens=2, extra_body=GREEDY, **options)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    # The tools' declarations are part of the prompt.
    assert counted.input_tokens > client.messages.count_tokens(model=MODEL, system=BRIEF, messages=HELLO).input_tokens


def test_structured_output_parses_into_the_model(client):
    message = client.messages.parse(model=MODEL, max_tokens=STRUCTURED_BUDGET, messages=HELLO,
                                    output_format=Verdict, extra_body=GREEDY)
    assert isinstance(message.parsed_output, Verdict)
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize("sent_back", ["objects", "model_dump"])
def test_a_tool_round_trip(client, sent_back):
    """The call is sent back as the SDK's blocks themselves, or as their model_dump() (every field,
    None ones too): both as a client writes it."""
    question = {"role": "user", "content": "What will the weather be in Paris?"}
    called = client.messages.create(model=MODEL, max_tokens=STRUCTURED_BUDGET, messages=[question],
                                    tools=[WEATHER_TOOL], tool_choice={"type": "any"}, extra_body=GREEDY)
    [use] = called.content
    assert (use.type, use.name, called.stop_reason) == ("tool_use", "get_weather", "tool_use")
    assert use.id.startswith("toolu_")
    jsonschema.validate(use.input, CITY)

    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                           "content": [{"type": "text", "text": '{"forecast": "sunny"}'}]}]}
    answer = client.messages.create(model=MODEL, max_tokens=8, tools=[WEATHER_TOOL], tool_choice={"type": "none"},
                                    messages=[question, {"role": "assistant", "content": sent(called.content, sent_back)},
                                              result],
                                    extra_body=GREEDY)
    assert [block.type for block in answer.content] == ["text"] and text_of(answer)
    unanswered = client.messages.count_tokens(model=MODEL, messages=[question], tools=[WEATHER_TOOL],
                                              tool_choice={"type": "none"})
    # The call and its result were read.
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens > unanswered.input_tokens


def test_a_named_tool_streams_its_input_as_json(client):
    with client.messages.stream(model=MODEL, max_tokens=STRUCTURED_BUDGET, messages=HELLO, tools=[WEATHER_TOOL],
                                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as stream:
        deltas = [event.delta.partial_json for event in stream
                  if event.type == "content_block_delta" and event.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    [use] = final.content
    assert json.loads("".join(deltas)) == use.input and final.stop_reason == "tool_use"
    jsonschema.validate(use.input, CITY)


@pytest.mark.parametrize(("options", "where"), [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
     "messages.0.content.0"),
    ({"messages": HELLO, "extra_body": {"temperature": 1.5}}, "temperature"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "prefill"),
    ({"messages": HELLO, "tool_choice": {"type": "any"}}, "tool_choice needs tools"),
    ({"messages": [{"role": "user", "content": " "}]}, "'messages' is empty"),
])
def test_bad_input_is_a_400_in_anthropic_shape(client, options, where):
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=MODEL, max_tokens=8, **options)
    body = refused.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert where in body["error"]["message"]


def test_a_validation_error_without_the_sdk_is_in_anthropic_shape(http):
    response = http.post(f"/{MODEL}/v1/messages", json={"model": MODEL, "messages": HELLO})  # no max_tokens
    assert response.status_code == 400
    assert response.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "Invalid 'max_tokens': Field required."}}


def test_an_unknown_model_is_a_404_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as refused:
        client.messages.create(model="claude-opus-9", max_tokens=8, messages=HELLO)
    assert refused.value.response.json()["error"]["type"] == "not_found_error"


def test_the_api_key_is_taken_as_x_api_key(base_url):
    locked = f"{base_url}/tiny-locked"
    message = Anthropic(base_url=locked, api_key=API_KEY, max_retries=0).messages.create(
        model=MODEL, max_tokens=3, messages=HELLO)
    assert message.usage.output_tokens == 3
    # Bearer works on the Messages routes too (the SDK's auth_token), and x-api-key on OpenAI's.
    assert Anthropic(base_url=locked, auth_token=API_KEY, max_retries=0).messages.count_tokens(
        model=MODEL, messages=HELLO).input_tokens > 0
    assert httpx.get(f"{locked}/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    with pytest.raises(anthropic.AuthenticationError) as refused:
        Anthropic(base_url=locked, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=3, messages=HELLO)
    assert refused.value.response.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": "Invalid API key."}}


def test_langchain_chat_anthropic_gives_the_sdk_reply(base_url, client):
    from langchain_anthropic import ChatAnthropic

    chat = ChatAnthropic(base_url=f"{base_url}/{MODEL}", api_key="unused", model=MODEL, max_tokens=12,
                         temperature=0, max_retries=0)
    reply = chat.invoke([("system", BRIEF), ("human", "Say hello.")])
    sdk = client.messages.create(model=MODEL, max_tokens=12, system=BRIEF, messages=HELLO, extra_body=GREEDY)
    assert reply.content == text_of(sdk)
    assert reply.usage_metadata["output_tokens"] == 12


def test_default_model_answers_in_a_schema_and_calls_a_forced_tool(base_url):
    """Structured output and a forced tool call on the real model."""
    client = Anthropic(base_url=f"{base_url}/api", api_key="unused", max_retries=0, timeout=300)
    person = {"type": "object", "required": ["name", "age", "city"], "additionalProperties": False, "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}}}
    message = client.messages.create(
        model="SmolLM2-135M-Instruct", max_tokens=96, extra_body=GREEDY,
        messages=[{"role": "user", "content": "Invent a person and give their name, age and city as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": person}})
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), person)

    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    message = client.messages.create(
        model="SmolLM2-135M-Instruct", max_tokens=64, extra_body=GREEDY,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"name": "get_weather", "description": "Current weather in a city", "input_schema": weather}],
        tool_choice={"type": "tool", "name": "get_weather"})
    [use] = message.content
    assert use.type == "tool_use" and use.name == "get_weather" and message.stop_reason == "tool_use"
    jsonschema.validate(use.input, weather)
