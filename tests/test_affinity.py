"""Conversations across two model replicas (tiny-pair, routed as deploy.yaml routes the
default model): each conversation's turns reach the replica that holds its prefix cache,
which the turn's cached tokens show (a turn on the other replica would find nothing)."""

import pytest
from openai import OpenAI


def converse(client: OpenAI, opening: str, session: str | None, turns: int = 3) -> list:
    """A conversation as chat clients send it, the whole history every turn; each turn's usage."""
    history, usages = [{"role": "user", "content": opening}], []
    for turn in range(turns):
        completion = client.chat.completions.create(
            model="tiny-chat", messages=history, max_tokens=8, temperature=0,
            extra_headers={"x-session-id": session} if session else None)
        usages.append(completion.usage)
        history += [{"role": "assistant", "content": completion.choices[0].message.content},
                    {"role": "user", "content": f"And then, {turn}?"}]
    return usages


@pytest.mark.parametrize("named", [True, False], ids=["x-session-id", "by its opening"])
def test_each_conversation_stays_with_the_replica_holding_its_prefix(base_url, named):
    client = OpenAI(base_url=f"{base_url}/tiny-pair/v1", api_key="unused", max_retries=0)
    for i in range(6):  # by chance alone, 12 later turns would all meet their cache 1 time in 4096
        usages = converse(client, f"Conversation {i} ({named}): hello there!", f"chat-{i}-{named}" if named else None)
        for previous, usage in zip(usages, usages[1:]):
            assert usage.prompt_tokens_details.cached_tokens >= previous.prompt_tokens, (i, usages)


def test_a_malformed_session_id_is_refused_with_its_reason(http):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for bad in ("x" * 201, "has spaces"):
        response = http.post("/tiny-pair/v1/chat/completions", json=body, headers={"x-session-id": bad})
        assert response.status_code == 400
        assert "x-session-id" in response.json()["error"]["message"], response.json()
