"""The OpenAI-compatible API, driven by the official `openai` client, against real Serve (tiny models)."""

import json

import openai
import pytest
from openai import OpenAI


@pytest.fixture
def client(base_url):
    return OpenAI(base_url=f"{base_url}/tiny-chat/v1", api_key="unused", max_retries=0)


HELLO = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello."}]


def test_models_lists_the_served_model(client, base_url):
    [card] = client.models.list().data
    assert card.id == "tiny-chat"
    # What a client needs beyond OpenAI's card: the context, the weights as run, and the engine's path.
    assert (card.loaded, card.context_length, card.quantization, card.engine, card.engine_reason) == \
        (True, 4096, "int4", "textbot", None)
    # GPT-2 has no family file: it runs on transformers' forward, and the card says why.
    [gpt2] = OpenAI(base_url=f"{base_url}/tiny-gpt2/v1", api_key="unused", max_retries=0).models.list().data
    assert gpt2.engine == "transformers" and "'gpt2' architecture has no family file" in gpt2.engine_reason


def test_non_streaming_completion_with_usage(client):
    completion = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens > 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_streaming_matches_non_streaming_and_reports_usage(client):
    whole = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-chat", messages=HELLO, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(c.id, c.created) for c in chunks}) == 1  # one completion, one id
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1
    assert "".join(content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_next_turn_reports_the_prompt_tokens_read_from_the_prefix_cache(client):
    first = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    history = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And again?"}]
    second = client.chat.completions.create(model="tiny-chat", messages=history, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model="tiny-chat", messages=history, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    # The same prompt again: all of it but its last token comes from the cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content


def test_logit_bias_and_penalties_steer_the_reply(client, tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-chat"])
    [forced] = tokenizer.encode("Hello")[:1]
    reply = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=4, temperature=0,
                                           logit_bias={str(forced): 100})
    assert tokenizer.encode(reply.choices[0].message.content) == [forced] * 4
    # A bias of 10 forces the token every time; with penalties each use costs more (2 once, 2 a use).
    def uses(**penalties) -> int:
        reply = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=6, temperature=0,
                                               logit_bias={str(forced): 10}, **penalties)
        return tokenizer.encode(reply.choices[0].message.content).count(forced)

    assert uses() == 6
    assert uses(frequency_penalty=2.0, presence_penalty=2.0) < 6


def test_parameters_that_do_not_change_the_reply_are_accepted(client):
    plain = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=6, temperature=0)
    with_extras = client.chat.completions.create(
        model="tiny-chat", messages=HELLO, max_tokens=6, temperature=0, user="ada", store=False,
        metadata={"ticket": "4711"}, parallel_tool_calls=False, service_tier="auto")
    assert with_extras.choices[0].message.content == plain.choices[0].message.content


def test_max_completion_tokens_is_honoured(client):
    completion = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_completion_tokens=5,
                                                temperature=0)
    assert completion.usage.completion_tokens == 5


def test_stop_string_ends_the_reply_and_never_reaches_the_client(client):
    full = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.index(stop)]

    for stream in (False, True):
        response = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=24,
                                                  temperature=0, stop=[stop, "never-seen"], stream=stream)
        if stream:
            chunks = list(response)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            got, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert got == expected
        assert finish == "stop"


def test_stream_has_sse_framing_and_no_buffering_headers(http):
    with http.stream("POST", "/tiny-chat/v1/chat/completions",
                     json={"messages": HELLO, "max_tokens": 3, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": HELLO, "n": 9}, 400, "n"),
        ({"messages": HELLO, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
        ({"messages": HELLO, "top_logprobs": 2}, 400, None),
        ({"messages": HELLO, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "strict": True, "schema": {"type": "string", "format": "no-such-format"}}}},
         400, "response_format"),
        ({"messages": HELLO, "tool_choice": "required"}, 400, None),
        ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, None),
        ({"messages": [{"role": "tool", "content": "42"}]}, 400, "messages.0"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": HELLO, "temperature": 3}, 400, "temperature"),
        ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": HELLO, "stop": ""}, 400, "stop"),
        ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, None),
        ({"messages": HELLO, "tools": []}, 400, "tools"),
        ({"messages": HELLO, "model": "gpt-4o"}, 404, "model"),
        ({"messages": HELLO, "max_tokens": 4090}, 400, "messages"),
        ({"messages": [{"role": "user", "content": " "}]}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(http, body, status, param):
    response = http.post("/tiny-chat/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert len(error["message"]) > 10


def test_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.BadRequestError, match="less than or equal to 8"):
        client.chat.completions.create(model="tiny-chat", messages=HELLO, n=9)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
