"""The chat page as Serve serves it, through gradio_client; and the chat
function's handling of Gradio's history."""

import glob
import re
import time

import pytest

from tests.helpers.page import (FIGURES, FIGURES_ID, GREEDY_INPUTS, figures_of, finished, model_named, page_client,
                                partials, reply_of)
from ui.chat import Usage, conversation_model, figures_line, to_messages

def test_partials_grow_into_the_reply(tiny_page_url):
    client = page_client(tiny_page_url)
    outputs = partials(client, "Tell me a story")
    assert len(outputs) > 2
    assert all(later.startswith(earlier) for earlier, later in zip(outputs, outputs[1:]))
    assert len(outputs[-1]) > len(outputs[0])


def test_reply_is_the_backends_reply_for_the_same_conversation(tiny_page_url, http):
    reply = partials(page_client(tiny_page_url), "Hello there", ("Be kind.", 0.0, 1.0, 16))[-1]
    direct = http.post("/tiny-chat/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"}],
        "max_tokens": 16, "temperature": 0}).json()
    assert reply == direct["choices"][0]["message"]["content"]


def test_finished_reply_has_its_figures_and_request_id(tiny_page_url, http):
    outputs = finished(page_client(tiny_page_url), "Tell me a story")
    figures = figures_of(outputs[-1])
    assert FIGURES.match(figures["title"]), figures
    # The page's only model wrote it; greedy, max 16, the tiny model never stops early.
    assert figures["title"].startswith("tiny-chat · 16 tokens ·")
    note = FIGURES_ID.match(figures["id"])
    assert note and re.fullmatch(r"[0-9a-f-]{16,}", note["request_id"]) and note["model"] == "tiny-chat", figures
    # The same reply read again: its prompt now comes from the model replica's prefix cache.
    again = figures_of(finished(page_client(tiny_page_url), "Tell me a story")[-1])
    cached, prompt = map(int, re.search(r"(\d+) of (\d+) prompt tokens cached", again["title"]).groups())
    assert 0 < cached <= prompt


def test_backend_error_is_shown_not_hung(tiny_page_url):
    job = page_client(tiny_page_url).submit("x" * 40_000, *GREEDY_INPUTS, api_name="/chat")
    with pytest.raises(Exception, match="limit is 32000") as error:
        job.result(timeout=180)  # a bound on "not hung"; a loaded CI machine took over 60 s once
    assert "Traceback" not in str(error.value) and 'File "' not in str(error.value)


def test_busy_backend_is_reported_in_the_page(base_url):
    client = page_client(f"{base_url}/busy-page/")
    jobs = [client.submit(f"Story number {i}", "", 0.0, 1.0, 2048, api_name="/chat") for i in range(8)]
    errors = []
    for job in jobs:
        try:
            job.result(timeout=20)
        except Exception as error:  # noqa: BLE001 - the refusals are what we look for
            errors.append(str(error))
    for job in jobs:
        job.cancel()
    busy = [e for e in errors if "Try again in a few seconds" in e]
    assert busy, f"one slot and four waiting places cannot take eight replies at once: {errors}"


def duo_api_reply(http, message: str, model: str | None = None) -> str:
    body = {"messages": [{"role": "user", "content": message}], "max_tokens": 16, "temperature": 0}
    body |= {"model": model} if model else {}
    return http.post("/tiny-duo/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def replica_log_lines(serve_logs: str, pattern: str, request_id: str) -> list[str]:
    """The reply log lines of one request in the replicas' Serve logs (written a moment after the reply)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [line for path in glob.glob(f"{serve_logs}/{pattern}") for line in open(path, errors="replace")
                 if request_id in line and '"event": "reply"' in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(1)


def test_reply_from_the_picked_model_is_that_models_api_reply(base_url, http, serve_logs):
    outputs = finished(page_client(f"{base_url}/duo-page/"), "Hello there", GREEDY_INPUTS + ("tiny-gpt2",))
    assert reply_of(outputs[-1]) == duo_api_reply(http, "Hello there", "tiny-gpt2")
    assert reply_of(outputs[-1]) != duo_api_reply(http, "Hello there", "tiny-chat")  # the pick mattered
    figures = figures_of(outputs[-1])
    assert model_named(figures["title"]) == "tiny-gpt2", figures
    note = FIGURES_ID.match(figures["id"])
    assert note["model"] == "tiny-gpt2", figures  # kept with the conversation
    # Written by tiny-gpt2's own deployment (Textbot:tiny-gpt2), reached as the page reaches it.
    [line] = replica_log_lines(serve_logs, "replica_tiny-duo_Textbot_tiny-gpt2_*.log", note["request_id"])
    assert '"model": "tiny-gpt2"' in line and '"route": "page"' in line


def test_a_caller_that_names_no_model_gets_the_default(base_url, http):
    outputs = finished(page_client(f"{base_url}/duo-page/"), "Hello there")  # /chat as before the picker
    assert reply_of(outputs[-1]) == duo_api_reply(http, "Hello there")
    assert model_named(figures_of(outputs[-1])["title"]) == "tiny-chat"


def test_a_model_not_served_is_refused_naming_the_served_ones(base_url):
    job = page_client(f"{base_url}/duo-page/").submit("Hello there", *GREEDY_INPUTS, "gpt-5", api_name="/chat")
    with pytest.raises(Exception, match=r"The model 'gpt-5' is not served here; pick one of tiny-chat, tiny-gpt2\."):
        job.result(timeout=180)


def test_default_page_serves_the_default_model(base_url):
    outputs = partials(page_client(f"{base_url}/"), "Say hi in five words.", ("", 0.0, 1.0, 16))
    assert len(outputs) > 1
    assert outputs[-1].strip()


@pytest.mark.parametrize(
    "history",
    [
        # gradio_client sends strings; the browser sends lists of parts.
        [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada!"}],
        [{"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hi Ada!"}], "metadata": None},
         # The figures note under a reply is the page's, not the model's: never sent back.
         {"role": "assistant", "content": [], "metadata": {"title": "4 tokens · 0.10 s to first token"}}],
    ],
)
def test_history_in_either_gradio_shape_becomes_chat_messages(history):
    assert to_messages("What is my name?", history, " Be brief. ") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hi Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]


def note(model_in_id: str, title: str = "tiny-gpt2 · 4 tokens · 0.10 s to first token") -> dict:
    """A figures note as the browser keeps it in a saved conversation."""
    return {"role": "assistant", "content": [], "metadata": {"title": title, "id": model_in_id, "status": "done"}}


def test_a_saved_conversation_names_the_model_of_its_last_reply():
    said = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    assert conversation_model([*said, note("textbot-figures:1f2e-3d:tiny-chat"), *said,
                               note("textbot-figures::tiny-gpt2")]) == "tiny-gpt2"
    # Saved before the page named models, or no reply finished: nothing recorded.
    assert conversation_model([*said, note("textbot-figures:1f2e-3d", "4 tokens · 0.10 s to first token")]) is None
    assert conversation_model(said[:1]) is None


def test_the_figures_line_names_the_model_first():
    line = figures_line("tiny-gpt2", Usage(30, 12, 10), 0.31, 100.0, 101.1)
    assert line == "tiny-gpt2 · 12 tokens · 0.31 s to first token · 10.0 tokens/s · 10 of 30 prompt tokens cached"
    assert FIGURES.match(line)
