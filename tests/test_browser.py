"""The chat page in a real browser: Playwright driving Debian's Chromium against the served stack."""

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

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


def send(page: Page, message: str) -> None:
    page.get_by_test_id("textbox").fill(message)
    page.get_by_test_id("submit-button").click()


def wait_for_reply_to_finish(page: Page, turn: int, timeout_s: float = 180) -> None:
    """Wait for the bot's message of `turn` (1-based) and for the page to accept input again."""
    page.get_by_test_id("bot").nth(turn - 1).wait_for(timeout=timeout_s * 1000)
    page.get_by_test_id("stop-button").wait_for(state="hidden", timeout=timeout_s * 1000)
    page.get_by_test_id("submit-button").wait_for(state="visible", timeout=timeout_s * 1000)


def bot_text(page: Page, index: int = -1) -> str:
    bots = page.get_by_test_id("bot")
    return bots.nth(index).inner_text() if bots.count() else ""


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_reply_grows_in_the_page_and_stop_ends_it(page, base_url):
    page.goto(f"{base_url}/")
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
    first, second = "My name is Ada and I love sailing.", "What is my name?"
    page.goto(f"{base_url}/greedy-page/")
    send(page, first)
    wait_for_reply_to_finish(page, turn=1)
    send(page, second)
    wait_for_reply_to_finish(page, turn=2)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-two-turns.png")

    def backend_reply(messages):
        body = {"messages": messages, "temperature": 0, "max_tokens": 24}
        return http.post("/api/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    reply_one = backend_reply([{"role": "user", "content": first}])
    with_context = backend_reply([{"role": "user", "content": first},
                                  {"role": "assistant", "content": reply_one},
                                  {"role": "user", "content": second}])
    without_context = backend_reply([{"role": "user", "content": second}])

    assert page.get_by_test_id("bot").count() == 2
    assert normalised(bot_text(page, 0)) == normalised(reply_one)
    assert normalised(bot_text(page, 1)) == normalised(with_context)
    assert with_context != without_context


def test_long_conversation_is_trimmed_and_the_user_told(page, base_url):
    page.goto(f"{base_url}/gpt2-page/")
    for turn in range(1, 5):
        send(page, f"Turn {turn}: " + "tell me about the robot who sails the sea " * 5)
        wait_for_reply_to_finish(page, turn=turn)
    page.get_by_text("outgrew the model's context").first.wait_for(timeout=30_000)
    assert page.get_by_test_id("bot").count() == 4
