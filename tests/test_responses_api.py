"""OpenAI's Responses API (`POST /v1/responses`) through the openai SDK, unchanged: `responses.create`,
`responses.stream` and `responses.parse` against the real stack (the tiny chat model, greedy; the
default model for one structured-output and tool case).

The route shares its engine path with chat completions (backend/openai/plan.py), so the same
conversation gives the same reply through either; each test checks what the SDK's own types
parse out of the events and objects.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.helpers.schemas import Verdict

MODEL = "tiny-chat"
BRIEF = "You are brief."
STRUCTURED_BUDGET = 200  # generous: a bounded schema's grammar finishes well before it
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather forecast for a city.",
                "parameters": CITY, "strict": True}


@pytest.fixture
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/{MODEL}/v1", api_key="unused", max_retries=0, timeout=120)


def test_string_input_and_instructions_give_the_chat_completion_reply_with_usage(client):
    response = client.responses.create(model=MODEL, instructions=BRIEF, input="Say hello.",
                                       max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": BRIEF}, {"role": "user", "content": "Say hello."}])

    assert response.output_text == chat.choices[0].message.content
    # The budget ran out: OpenAI's "incomplete", with the reason.
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    [message] = response.output
    assert (message.type, message.role, message.content[0].type) == ("message", "assistant", "output_text")
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    assert usage.total_tokens == usage.input_tokens + 12
    assert response.store is False and response.instructions == BRIEF and response.model == MODEL


def test_input_as_messages_is_the_same_conversation(client):
    as_string = client.responses.create(model=MODEL, instructions=BRIEF, input="Say hello.",
                                        max_output_tokens=10, temperature=0)
    as_items = client.responses.create(model=MODEL, max_output_tokens=10, temperature=0, input=[
        {"role": "developer", "content": BRIEF},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}])
    assert as_items.output_text == as_string.output_text


def test_the_second_turn_reports_cached_input_tokens(client):
    first = client.responses.create(model=MODEL, input="Tell me about robots.", max_output_tokens=8, temperature=0)
    # The earlier output items go back as they are: a common way to continue without stored state.
    second = client.responses.create(model=MODEL, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "Tell me about robots."}, *first.output, {"role": "user", "content": "More."}])
    assert 0 < second.usage.input_tokens_details.cached_tokens < second.usage.input_tokens


def test_stream_events_parse_and_add_up_to_the_reply(client):
    whole = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0)
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0) as stream:
        events = list(stream)

    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 12


@pytest.mark.parametrize("streamed", [False, True])
def test_json_schema_output_parses_into_the_model(client, streamed):
    options = dict(model=MODEL, input="Rate your day.", text_format=Verdict, max_output_tokens=STRUCTURED_BUDGET,
                   temperature=0)
    if streamed:
        with client.responses.stream(**options) as stream:
            response = stream.get_final_response()
    else:
        response = client.responses.parse(**options)
    assert isinstance(response.output_parsed, Verdict)
    assert response.status == "completed"


def test_json_object_output_is_an_object(client):
    response = client.responses.create(model=MODEL, input="Rate your day as JSON.", temperature=0,
                                       max_output_tokens=STRUCTURED_BUDGET, text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(response.output_text), dict)


@pytest.mark.parametrize("sent_back", ["objects", "model_dump"])
def test_a_tool_round_trip(client, sent_back):
    """The call is sent back as the SDK's output items themselves, or as their model_dump() (every
    field, None ones too, by their Python names): both as a client writes it."""
    question = {"role": "user", "content": "What will the weather be in Paris?"}
    called = client.responses.create(model=MODEL, input=[question], tools=[WEATHER_TOOL], tool_choice="required",
                                     max_output_tokens=STRUCTURED_BUDGET, temperature=0)
    [call] = called.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    jsonschema.validate(json.loads(call.arguments), CITY)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"forecast": "sunny"})}
    earlier = called.output if sent_back == "objects" else [item.model_dump() for item in called.output]
    answer = client.responses.create(model=MODEL, input=[question, *earlier, result], tools=[WEATHER_TOOL],
                                     tool_choice="none", max_output_tokens=8, temperature=0)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text
    unanswered = client.responses.create(model=MODEL, input=[question], tools=[WEATHER_TOOL], tool_choice="none",
                                         max_output_tokens=1, temperature=0)
    assert answer.usage.input_tokens > unanswered.usage.input_tokens  # the call and its result were read


def test_a_named_tool_call_streams_its_arguments(client):
    with client.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER_TOOL],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 max_output_tokens=STRUCTURED_BUDGET, temperature=0) as stream:
        events = list(stream)
        response = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and kinds[-1] == "response.completed"
    assert kinds[-3:-1] == ["response.function_call_arguments.done", "response.output_item.done"]
    [call] = response.output
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == call.arguments
    jsonschema.validate(call.parsed_arguments, CITY)  # the SDK parsed the arguments of a strict tool


@pytest.mark.parametrize(("options", "param"), [
    ({"input": "Hi", "previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}, "input.0"),
    ({"input": "Hi", "temperature": 3}, "temperature"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "Hi", "tool_choice": "required"}, None),
    ({"input": "  "}, "input"),
])
def test_bad_input_is_a_400_in_openai_shape(client, options, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, **options)
    error = refused.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].endswith(".") and len(error["message"]) > 20


def test_previous_response_id_is_refused_with_what_to_do_instead(client):
    with pytest.raises(openai.BadRequestError, match="stores no responses.*whole conversation in 'input'"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.responses.create(model="gpt-5", input="Hi")


def test_default_model_answers_in_a_schema_and_calls_a_forced_tool(base_url):
    """Structured output and a forced tool call on the real model."""
    client = OpenAI(base_url=f"{base_url}/api/v1", api_key="unused", max_retries=0, timeout=300)
    person = {"type": "object", "required": ["name", "age", "city"], "additionalProperties": False, "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}}}
    response = client.responses.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_output_tokens=96,
        input="Invent a person and give their name, age and city as JSON.",
        text={"format": {"type": "json_schema", "name": "person", "schema": person, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), person)

    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}
    response = client.responses.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_output_tokens=64, input="What is the weather in Paris?",
        tools=[{"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": weather, "strict": True}],
        tool_choice={"type": "function", "name": "get_weather"})
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), weather)
