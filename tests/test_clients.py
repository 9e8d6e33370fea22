"""The clients people use, unchanged, against the OpenAI API: the openai SDK, LangChain's
ChatOpenAI and LiteLLM.

Each test drives the tiny chat model as a user of that client would (only a base URL and a dummy
key set) and checks what the client hands back: replies, streams and usage; structured output that
parses and validates; tool calls whose arguments match the tool's schema; logprobs; more than one
choice; and the legacy /v1/completions route. The `sent` fixture records the JSON bodies the
clients post (run with -s to print them), so a test can also show the request shape the server
must accept.
"""

from __future__ import annotations

import json
import os
from typing import Literal

# LiteLLM reads these at import: use its bundled price list and tokenizers, fetch nothing.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_OFFLINE_MODE"] = "true"

import httpx  # noqa: E402
import httpx2  # noqa: E402  (the openai SDK's HTTP client; LiteLLM may use either)
import jsonschema  # noqa: E402
import litellm  # noqa: E402
import pytest  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from openai import OpenAI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from tests.helpers.schemas import Verdict  # noqa: E402

MODEL = "tiny-chat"
HELLO = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello."}]
LC_HELLO = [SystemMessage("You are brief."), HumanMessage("Say hello.")]
ASK_JSON = [{"role": "user", "content": "Rate your day as JSON."}]
STRUCTURED_BUDGET = 200  # generous: a bounded schema's grammar finishes well before it
PROMPTS = ["Once upon a time", "Hello there!"]


class GetWeather(BaseModel):
    """The weather forecast for a city."""

    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)


# --- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture
def api(base_url) -> str:
    return f"{base_url}/{MODEL}/v1"


@pytest.fixture
def client(api) -> OpenAI:
    return OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def chat(api):
    """LangChain's ChatOpenAI on the tiny model, greedy; keyword arguments override."""
    def make(**options) -> ChatOpenAI:
        return ChatOpenAI(**{"base_url": api, "api_key": "unused", "model": MODEL, "temperature": 0,
                             "max_tokens": 12, "max_retries": 0, "timeout": 120, **options})
    return make


@pytest.fixture
def lite(api):
    """litellm.completion / text_completion against our server only, as its docs show for an
    OpenAI-compatible endpoint."""
    def call(function, model: str, **params):
        return function(model=model, api_base=api, api_key="unused", temperature=0, max_retries=0,
                        timeout=120, **params)
    return call


@pytest.fixture
def sent(monkeypatch, base_url) -> list[dict]:
    """The JSON bodies of the POSTs the clients send to the server (printed with -s)."""
    bodies: list[dict] = []

    def recording(original):
        def send(self, request, **kwargs):
            if request.method == "POST" and str(request.url).startswith(base_url):
                bodies.append(json.loads(request.read()))
                print(f"\n--> POST {request.url.path} {json.dumps(bodies[-1])}")
            return original(self, request, **kwargs)
        return send

    for client_class in (httpx.Client, httpx2.Client):
        monkeypatch.setattr(client_class, "send", recording(client_class.send))
    return bodies


def reply_of(client: OpenAI, **params) -> str:
    completion = client.chat.completions.create(model=MODEL, temperature=0, **params)
    return completion.choices[0].message.content


def text_of(client: OpenAI, prompt: str, **params) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, **params).choices[0].text


def check_greedy_logprobs(entries, top: int) -> None:
    """Each token's logprob is a log-probability, `top` alternatives come best first, and under
    greedy decoding the chosen token is the best of them."""
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == top
        ranked = [alt.logprob for alt in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(ranked[0], abs=1e-4)


def check_tool_call(message: AIMessage) -> dict:
    """One well-formed GetWeather call; returns its arguments."""
    [call] = message.tool_calls
    assert message.invalid_tool_calls == []
    assert call["name"] == "GetWeather"
    assert call["id"]
    GetWeather.model_validate(call["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"
    return call["args"]


# --- LangChain: replies, streams, usage -------------------------------------------------------

def test_langchain_invoke_gives_the_same_reply_as_the_sdk(chat, client):
    message = chat().invoke(LC_HELLO)
    assert isinstance(message, AIMessage)
    assert message.content == reply_of(client, messages=HELLO, max_tokens=12)
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 12


def test_langchain_stream_pieces_add_up_to_the_reply(chat):
    llm = chat()
    pieces = [chunk.content for chunk in llm.stream(LC_HELLO)]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == llm.invoke(LC_HELLO).content


def test_langchain_streamed_usage(chat, sent):
    total = None
    for chunk in chat(stream_usage=True).stream(LC_HELLO):
        total = chunk if total is None else total + chunk
    assert sent[-1]["stream_options"] == {"include_usage": True}
    assert total.usage_metadata["output_tokens"] == 12
    assert total.usage_metadata["input_tokens"] > 5
    assert total.usage_metadata["total_tokens"] == total.usage_metadata["input_tokens"] + 12


# --- LiteLLM: replies and streams -------------------------------------------------------------

def test_litellm_completion_gives_the_same_reply_as_the_sdk(lite, client):
    response = lite(litellm.completion, f"openai/{MODEL}", messages=HELLO, max_tokens=10)
    assert response.choices[0].message.content == reply_of(client, messages=HELLO, max_tokens=10)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 10


def test_litellm_stream_adds_up_to_the_reply_and_reports_usage(lite, client):
    chunks = list(lite(litellm.completion, f"openai/{MODEL}", messages=HELLO, max_tokens=10, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_of(client, messages=HELLO, max_tokens=10)
    assert [c.usage.completion_tokens for c in chunks if getattr(c, "usage", None)][-1] == 10


# --- openai SDK: structured output, n, logprobs, /v1/completions ------------------------------

def test_sdk_json_object_reply_parses(client):
    completion = client.chat.completions.create(model=MODEL, messages=ASK_JSON, temperature=0,
                                                max_tokens=STRUCTURED_BUDGET,
                                                response_format={"type": "json_object"})
    assert isinstance(json.loads(completion.choices[0].message.content), dict)
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("strict", [True, False])
def test_sdk_json_schema_reply_validates(client, strict):
    schema = Verdict.model_json_schema()
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK_JSON, temperature=0, max_tokens=STRUCTURED_BUDGET,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "verdict", "schema": schema, "strict": strict}})
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)
    assert completion.choices[0].finish_reason == "stop"


def test_sdk_parse_helper_returns_the_model(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ASK_JSON, temperature=0,
                                               max_tokens=STRUCTURED_BUDGET, response_format=Verdict)
    assert isinstance(completion.choices[0].message.parsed, Verdict)


def test_sdk_text_response_format_changes_nothing(client):
    plain = reply_of(client, messages=HELLO, max_tokens=8)
    assert reply_of(client, messages=HELLO, max_tokens=8, response_format={"type": "text"}) == plain


def test_sdk_two_choices(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    single = reply_of(client, messages=HELLO, max_tokens=6)
    assert [c.message.content for c in completion.choices] == [single, single]  # greedy: both the same
    assert completion.usage.completion_tokens == 12


def test_sdk_logprobs_with_alternatives(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=3)
    entries = completion.choices[0].logprobs.content
    assert len(entries) == completion.usage.completion_tokens == 8
    check_greedy_logprobs(entries, top=3)


def test_sdk_streamed_logprobs_match_the_whole_reply(client):
    params = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**params).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **params)
                if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)


def test_sdk_logprobs_without_alternatives(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=5,
                                                logprobs=True, top_logprobs=0)
    entries = completion.choices[0].logprobs.content
    assert len(entries) == 5
    assert all(e.logprob <= 0 and not e.top_logprobs for e in entries)


def test_sdk_completion_of_a_prompt(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8)
    choice = completion.choices[0]
    assert completion.object == "text_completion"
    assert choice.text and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_sdk_completion_of_a_list_of_prompts_answers_each(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=6)
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.text for c in completion.choices] == [text_of(client, p, max_tokens=6) for p in PROMPTS]


def test_sdk_completion_two_choices_per_prompt(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 12


def test_sdk_completion_echo_puts_the_prompt_first(client):
    echoed = text_of(client, PROMPTS[0], max_tokens=6, echo=True)
    assert echoed == PROMPTS[0] + text_of(client, PROMPTS[0], max_tokens=6)


def test_sdk_completion_stream_adds_up_to_the_text(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_of(client, PROMPTS[0], max_tokens=8)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sdk_completion_stop_string(client):
    full = text_of(client, PROMPTS[0], max_tokens=16)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=16,
                                           stop=[stop])
    assert completion.choices[0].text == full[: full.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_sdk_completion_logprobs(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6,
                                           logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, logprob, alternatives in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        # Greedy: the chosen token is among the best and none beats it. (Keys are token strings,
        # so two byte tokens that both print as U+FFFD share one.)
        assert 1 <= len(alternatives) <= 3 and token in alternatives
        assert max(alternatives.values()) <= logprob + 1e-4


# --- LangChain: structured output, tools, logprobs --------------------------------------------

def test_langchain_structured_output_as_json_schema(chat, sent):
    verdict = chat(max_tokens=STRUCTURED_BUDGET).with_structured_output(Verdict).invoke("Rate your day.")
    assert isinstance(verdict, Verdict)
    assert sent[-1]["response_format"]["type"] == "json_schema"


def test_langchain_structured_output_in_json_mode(chat, sent):
    result = chat(max_tokens=STRUCTURED_BUDGET).with_structured_output(
        Verdict.model_json_schema(), method="json_mode").invoke("Rate your day as JSON.")
    assert isinstance(result, dict)  # LangChain parsed the content as JSON
    assert sent[-1]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("tool_choice", ["required", "GetWeather"])
def test_langchain_forced_tool_call(chat, sent, tool_choice):
    llm = chat(max_tokens=STRUCTURED_BUDGET).bind_tools([GetWeather], tool_choice=tool_choice)
    check_tool_call(llm.invoke("What is the weather in Oslo?"))
    assert sent[-1]["tools"][0]["function"]["name"] == "GetWeather"


def test_langchain_streamed_tool_call(chat):
    llm = chat(max_tokens=STRUCTURED_BUDGET).bind_tools([GetWeather], tool_choice="required")
    message = None
    for chunk in llm.stream("What is the weather in Oslo?"):
        message = chunk if message is None else message + chunk
    check_tool_call(message)


def test_langchain_auto_tool_choice_gives_text_or_a_valid_call(chat):
    message = chat(max_tokens=STRUCTURED_BUDGET).bind_tools([GetWeather], tool_choice="auto").invoke(
        "What is the weather in Oslo?")
    if message.tool_calls:
        check_tool_call(message)
    else:
        assert message.content and message.response_metadata["finish_reason"] in ("stop", "length")


def test_langchain_conversation_with_a_tool_result(chat, sent):
    llm = chat(max_tokens=STRUCTURED_BUDGET)
    question = HumanMessage("What is the weather in Oslo?")
    called = llm.bind_tools([GetWeather], tool_choice="required").invoke([question])
    args = check_tool_call(called)
    result = ToolMessage(json.dumps({"forecast": "snow", **args}), tool_call_id=called.tool_calls[0]["id"])
    answer = llm.bind_tools([GetWeather], tool_choice="none").invoke([question, called, result])
    assert answer.content and not answer.tool_calls
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "tool"]  # the history went along


def test_langchain_logprobs(chat, sent):
    message = chat(logprobs=True, top_logprobs=2).invoke(LC_HELLO)
    assert (sent[-1]["logprobs"], sent[-1]["top_logprobs"]) == (True, 2)
    entries = message.response_metadata["logprobs"]["content"]
    assert len(entries) == message.usage_metadata["output_tokens"] == 12
    assert all(isinstance(e["token"], str) and e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
               for e in entries)


# --- LiteLLM: structured output, text completion ----------------------------------------------

def test_litellm_structured_output(lite, sent):
    response = lite(litellm.completion, f"openai/{MODEL}", messages=ASK_JSON, max_tokens=STRUCTURED_BUDGET,
                    response_format=Verdict)
    Verdict.model_validate_json(response.choices[0].message.content)
    assert sent[-1]["response_format"]["type"] == "json_schema"


def test_litellm_json_object(lite):
    response = lite(litellm.completion, f"openai/{MODEL}", messages=ASK_JSON, max_tokens=STRUCTURED_BUDGET,
                    response_format={"type": "json_object"})
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_litellm_text_completion(lite, client, sent):
    response = lite(litellm.text_completion, f"text-completion-openai/{MODEL}", prompt=PROMPTS[0], max_tokens=8)
    assert response.choices[0].text == text_of(client, PROMPTS[0], max_tokens=8)
    assert response.usage.completion_tokens == 8
    assert sent[0]["prompt"] == PROMPTS[0]


def test_litellm_text_completion_stream(lite, client):
    chunks = list(lite(litellm.text_completion, f"text-completion-openai/{MODEL}", prompt=PROMPTS[0],
                       max_tokens=8, stream=True))
    assert "".join(c.choices[0].text or "" for c in chunks if c.choices) == text_of(client, PROMPTS[0], max_tokens=8)
