"""The chat page in a real browser: Playwright driving Debian's Chromium against the served stack."""

import glob
import json
import re
import time
from pathlib import Path

import httpx
import pytest
import ray
from playwright.sync_api import Page, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.page import FIGURES, model_named

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Page:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    yield page
    page.close()


def open_page(page: Page, url: str) -> None:
    """Open the chat page and wait until it has loaded: its model picker filled by the page's
    load event. A message sent while that event's stream was closing never came back (a CI run:
    the reply was written, the browser got none of it), so the tests send once the page is
    ready, as a person would."""
    page.goto(url)
    expect(picker(page)).not_to_have_value("", timeout=60_000)


def send(page: Page, message: str) -> None:
    page.get_by_test_id("textbox").fill(message)
    page.get_by_test_id("submit-button").click()


def replies(page: Page):
    """The bot's replies. The figures note under each finished reply is a bot message too
    (a Gradio "thought"), so it is left out here."""
    return page.locator(".message:not(.thought) > [data-testid='bot']")


def figures(page: Page):
    return page.locator(".thought [data-testid='bot']")


def conversation(page: Page):
    return page.get_by_label("chatbot conversation")


def wait_for_reply_to_finish(page: Page, turn: int, timeout_s: float = 180) -> None:
    """Wait for the bot's reply of `turn` (1-based) and for the page to accept input again."""
    replies(page).nth(turn - 1).wait_for(timeout=timeout_s * 1000)
    page.get_by_test_id("stop-button").wait_for(state="hidden", timeout=timeout_s * 1000)
    page.get_by_test_id("submit-button").wait_for(state="visible", timeout=timeout_s * 1000)


def bot_text(page: Page, index: int = -1) -> str:
    bots = replies(page)
    return bots.nth(index).inner_text() if bots.count() else ""


def backend_reply(http, app: str, messages: list[dict], max_tokens: int, model: str | None = None) -> str:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens} | ({"model": model} if model else {})
    return http.post(f"/{app}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_reply_grows_in_the_page_and_stop_ends_it(page, base_url):
    open_page(page, f"{base_url}/")
    send(page, "Write a long story about a fox who learns to sail across the ocean.")
    page.get_by_test_id("stop-button").wait_for(state="visible", timeout=30_000)

    lengths, deadline = [], time.monotonic() + 120
    while len(set(lengths)) < 5 and time.monotonic() < deadline:
        lengths.append(len(bot_text(page)))
        time.sleep(0.1)
    distinct = sorted(set(lengths) - {0})
    assert len(distinct) >= 4, f"the reply did not grow visibly: {lengths}"
    assert distinct == sorted(dict.fromkeys(l for l in lengths if l)), "the reply shrank while streaming"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-streaming.png")
    page.get_by_test_id("stop-button").click()
    page.get_by_test_id("stop-button").wait_for(state="hidden", timeout=10_000)
    stopped_at = bot_text(page)
    time.sleep(2)
    assert bot_text(page) == stopped_at, "text kept arriving after Stop"
    assert page.get_by_test_id("submit-button").is_visible()


def test_second_turn_sees_the_first(page, base_url, http):
    """The page's second turn is the model's reply to the whole conversation. Each page reply is
    compared with the API's reply to the same messages read from the same cache state: the API is
    asked once before the page (its prompt is then cached but for the last token, as the page's
    will be) and once after. A reply is the same for the same cache state; read cold it may part
    from one whose prompt came from the prefix cache at a near tie (a prompt's numbers depend in
    the last bits on how its positions were split into reads: docs/BENCHMARKS.md, issue 29)."""
    first, second = "My name is Ada and I love sailing.", "What is my name?"

    def backend_reply(messages):
        body = {"messages": messages, "temperature": 0, "max_tokens": 24}
        return http.post("/api/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    turn_one = [{"role": "user", "content": first}]
    backend_reply(turn_one)
    open_page(page, f"{base_url}/greedy-page/")
    send(page, first)
    wait_for_reply_to_finish(page, turn=1)
    reply_one = backend_reply(turn_one)
    turn_two = [*turn_one, {"role": "assistant", "content": reply_one}, {"role": "user", "content": second}]
    backend_reply(turn_two)
    send(page, second)
    wait_for_reply_to_finish(page, turn=2)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-two-turns.png")
    with_context = backend_reply(turn_two)
    without_context = backend_reply([{"role": "user", "content": second}])

    assert replies(page).count() == 2
    assert normalised(bot_text(page, 0)) == normalised(reply_one)
    assert normalised(bot_text(page, 1)) == normalised(with_context)
    assert with_context != without_context


def test_long_conversation_is_trimmed_and_the_user_told(page, base_url):
    open_page(page, f"{base_url}/gpt2-page/")
    for turn in range(1, 5):
        send(page, f"Turn {turn}: " + "tell me about the robot who sails the sea " * 5)
        wait_for_reply_to_finish(page, turn=turn)
    page.get_by_text("outgrew the model's context").first.wait_for(timeout=30_000)
    assert replies(page).count() == 4


def test_figures_appear_under_each_finished_reply(page, base_url):
    open_page(page, f"{base_url}/tiny-page/")
    for turn, message in enumerate(["Hello there", "Tell me more"], start=1):
        send(page, message)
        wait_for_reply_to_finish(page, turn=turn)
        figures(page).nth(turn - 1).wait_for(timeout=30_000)
    lines = [normalised(figures(page).nth(i).inner_text()) for i in range(2)]
    assert all(FIGURES.match(line) for line in lines), lines
    # Each note sits under its reply: reply, note, reply, note in the page's order.
    order = page.locator(".message:not(.thought) > [data-testid='bot'], .thought [data-testid='bot']")
    kinds = ["note" if FIGURES.match(normalised(order.nth(i).inner_text())) else "reply" for i in range(order.count())]
    assert kinds == ["reply", "note", "reply", "note"], kinds
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-figures.png")


def test_edited_message_reruns(page, base_url, http):
    open_page(page, f"{base_url}/tiny-page/")
    send(page, "Hello there")
    wait_for_reply_to_finish(page, turn=1)
    first = bot_text(page)
    chat = conversation(page)
    page.get_by_test_id("user").first.hover()
    chat.get_by_label("Edit").first.click()
    chat.locator("textarea.edit-textarea").fill("Tell me a story")
    chat.get_by_label("Submit").first.click()
    expected = backend_reply(http, "tiny-chat", [{"role": "user", "content": "Tell me a story"}], 16)

    def rerun_finished() -> bool:
        # The old reply and its figures go first, then the re-run streams in: wait for the
        # page's final state rather than a step of it (a step's locator may still match the old reply).
        return (page.get_by_test_id("user").count() == 1 and replies(page).count() == 1
                and figures(page).count() == 1 and normalised(bot_text(page)) == normalised(expected))

    deadline = time.monotonic() + 120
    while not rerun_finished() and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert page.get_by_test_id("user").first.inner_text().strip() == "Tell me a story"
    assert page.get_by_test_id("user").count() == 1 and replies(page).count() == 1
    assert normalised(bot_text(page)) == normalised(expected) != normalised(first)


def replica_actor(app: str):
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{app}#ChatPage#")]
    return replica


def test_conversation_survives_a_reload_and_a_restart_of_the_page(page, base_url):
    url, message = f"{base_url}/tiny-page/", f"Lighthouse {time.time_ns() % 10**6}"  # short: the history list cuts long titles
    open_page(page, url)
    send(page, message)
    wait_for_reply_to_finish(page, turn=1)
    figures(page).first.wait_for(timeout=30_000)
    reply = bot_text(page)
    # Saving is a later event of its own (ChatInterface's save, then the browser's write to
    # localStorage): reloading before the history list shows it would lose the turn.
    saved = page.locator("tr.tr-body", has_text=message)
    saved.wait_for(timeout=60_000)

    def reopened() -> None:
        # Away from the old page first: once its replica is killed, its own scripts may navigate
        # while the test does, and the test's navigation was aborted (net::ERR_ABORTED, a CI-like run).
        page.goto("about:blank")
        open_page(page, url)
        saved.wait_for(timeout=60_000)
        saved.first.click()
        page.get_by_test_id("user").filter(has_text=message).wait_for(timeout=30_000)
        assert normalised(bot_text(page)) == normalised(reply)

    reopened()
    # A new page replica: Serve replaces the killed one; the stable secret still decrypts.
    before = replica_actor("tiny-page")
    ray.kill(ray.get_actor(before["name"], namespace=before["namespace"]), no_restart=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        replaced = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::tiny-page#ChatPage#") and a["name"] != before["name"]]
        try:  # a new replica still importing Gradio on a busy machine may not answer within the timeout
            if replaced and httpx.get(f"{url}config", timeout=10).status_code == 200:
                break
        except httpx.TimeoutException:
            pass
        time.sleep(1)
    else:
        raise AssertionError("Serve did not replace the killed chat page replica")
    reopened()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-history.png")


def feedback_count(metrics_url: str, app: str, value: str) -> float:
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if (sample.name == "ray_textbot_feedback_total" and sample.labels.get("application") == app
                    and sample.labels.get("value") == value):
                return sample.value
    return 0.0


def test_a_like_is_counted_and_logged_with_the_replys_request_id(page, base_url, metrics_url, serve_logs):
    before = feedback_count(metrics_url, "tiny-page", "like")
    open_page(page, f"{base_url}/tiny-page/")
    send(page, "Hello there")
    wait_for_reply_to_finish(page, turn=1)
    figures(page).first.wait_for(timeout=30_000)
    conversation(page).get_by_label("Like").last.click()
    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while feedback_count(metrics_url, "tiny-page", "like") < before + 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert feedback_count(metrics_url, "tiny-page", "like") >= before + 1

    logs = serve_logs
    def lines(pattern: str) -> list[str]:
        return [line for path in glob.glob(f"{logs}/{pattern}") for line in open(path, errors="replace")]
    deadline = time.monotonic() + 30
    while not (liked := [l for l in lines("replica_tiny-page_ChatPage_*.log") if '"event": "feedback"' in l]) \
            and time.monotonic() < deadline:
        time.sleep(1)
    record = json.loads(liked[-1][liked[-1].index("{\"event\""):])
    assert record["value"] == "like" and record["reply_request_id"]
    # The model replica's line for that reply carries the same request id.
    assert any(record["reply_request_id"] in l and '"route": "page"' in l
               for l in lines("replica_tiny-chat_Textbot_*.log"))


def picker(page: Page):
    return page.get_by_role("combobox", name="Model")


def offered_models(page: Page) -> list[str]:
    """The picker's choices, in order (it opens on a click; a second click does not reopen it)."""
    picker(page).click()
    return [option.get_attribute("aria-label") for option in page.get_by_role("option").all()]


def pick(page: Page, model: str) -> None:
    """Pick from the open picker."""
    page.get_by_role("option", name=model, exact=True).click()
    expect(picker(page)).to_have_value(model)


def test_a_picked_model_answers_and_stays_picked_for_its_conversation(page, base_url, http):
    url, message = f"{base_url}/duo-page/", f"Harbour {time.time_ns() % 10**6}"  # short: the history list cuts long titles
    page.goto(url)
    # The served models, asked of the backend as the page loads: the default first, and picked.
    expect(picker(page)).to_have_value("tiny-chat", timeout=60_000)
    assert offered_models(page) == ["tiny-chat", "tiny-gpt2"]
    pick(page, "tiny-gpt2")
    send(page, message)
    wait_for_reply_to_finish(page, turn=1)
    figures(page).first.wait_for(timeout=30_000)
    assert normalised(bot_text(page)) == normalised(
        backend_reply(http, "tiny-duo", [{"role": "user", "content": message}], 16, model="tiny-gpt2"))
    assert model_named(normalised(figures(page).first.inner_text())) == "tiny-gpt2"
    saved = page.locator("tr.tr-body", has_text=message)
    saved.wait_for(timeout=60_000)  # saved to the browser's storage: see the reload test above

    page.goto(url)
    expect(picker(page)).to_have_value("tiny-chat", timeout=60_000)  # a new conversation: the default
    saved.first.click()
    page.get_by_test_id("user").filter(has_text=message).wait_for(timeout=30_000)
    expect(picker(page)).to_have_value("tiny-gpt2", timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-model-picker.png")
    # The restored pick writes the conversation's next reply.
    send(page, "And then?")
    wait_for_reply_to_finish(page, turn=2)
    figures(page).nth(1).wait_for(timeout=30_000)
    assert model_named(normalised(figures(page).nth(1).inner_text())) == "tiny-gpt2"


def test_the_page_says_a_sleeping_model_is_loading(page, base_url, http):
    # Asleep: Serve runs no replica of it until a request comes (SLEEPING in conftest).
    assert [(m["id"], m["loaded"]) for m in http.get("/page-sleepy/v1/models").json()["data"]] == \
        [("tiny-dozing", False)]
    page.goto(f"{base_url}/sleepy-page/")
    expect(picker(page)).to_have_value("tiny-dozing", timeout=60_000)
    send(page, "Hello there")
    page.get_by_text("tiny-dozing is loading: its first reply waits for it to start.").wait_for(timeout=60_000)
    wait_for_reply_to_finish(page, turn=1)
    assert normalised(bot_text(page)) == normalised(
        backend_reply(http, "page-sleepy", [{"role": "user", "content": "Hello there"}], 16))
