"""Conversations longer than the model's context: refused on request, trimmed where asked."""

from backend.engine.prompt import fit_to_context
from backend.protocol import ChatMessage


def words(messages):
    return sum(len(m.content.split()) for m in messages)


def turn(role, n):
    return ChatMessage(role=role, content=" ".join([role] * n))


def test_oldest_turns_go_first_keeping_system_and_last_message():
    conversation = [turn("system", 5), turn("user", 10), turn("assistant", 10), turn("user", 10),
                    turn("assistant", 10), turn("user", 10)]
    fitted, dropped = fit_to_context(conversation, words, max_prompt_tokens=40)
    assert dropped == 2
    assert fitted == [conversation[0], *conversation[3:]]


def test_a_conversation_that_fits_is_untouched():
    conversation = [turn("user", 3), turn("assistant", 3), turn("user", 3)]
    assert fit_to_context(conversation, words, 100) == (conversation, 0)


def test_the_last_message_is_kept_even_when_alone_it_is_too_long():
    conversation = [turn("user", 10), turn("assistant", 10), turn("user", 500)]
    fitted, dropped = fit_to_context(conversation, words, 100)
    assert fitted == [conversation[-1]] and dropped == 2


LONG_TURNS = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: " + "the robot sails " * 12}
              for i in range(9)]


def test_openai_route_refuses_an_overlong_conversation_with_400(http):
    response = http.post("/tiny-gpt2/v1/chat/completions", json={"messages": LONG_TURNS, "max_tokens": 16})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_truncation_auto_drops_the_oldest_turns_and_says_how_many(http):
    messages = [{"role": "system", "content": "Be brief."}, *LONG_TURNS]
    response = http.post("/tiny-gpt2/v1/chat/completions",
                         json={"messages": messages, "max_tokens": 16, "truncation": "auto"})
    assert response.status_code == 200
    dropped = int(response.headers["x-textbot-dropped-messages"])
    assert 0 < dropped < len(LONG_TURNS)
    kept = [messages[0], *LONG_TURNS[dropped:]]
    direct = http.post("/tiny-gpt2/v1/chat/completions", json={"messages": kept, "max_tokens": 16})
    assert direct.json()["choices"][0]["message"]["content"] == response.json()["choices"][0]["message"]["content"]
    assert response.json()["usage"]["prompt_tokens"] == direct.json()["usage"]["prompt_tokens"]
