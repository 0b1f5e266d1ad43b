"""The demo in a real browser: headless Chromium types into the page and reads what it shows.

Three backends: `fermi serve openai` on tiny-qwen3 (streaming and KV-cache reuse end to end),
a scripted stub (the thinking panel and the exact request fields, which the random-weight tiny
model cannot show), and a closed port (the server-down message). Screenshots land in
test-artifacts/."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from demo_processes import REPO, demo_app, free_port
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from stub_server import ANSWER, FAIL_MESSAGE, FAIL_WORD, REASONING, SLOW_WORD, StubOpenAI

TURN_TIMEOUT_S = 120
ARTIFACTS_DIR = REPO / "test-artifacts"
SESSION_RE = re.compile(r"gradio-[0-9a-f]{32}")


class ChatPage:
    """The demo page, as a person uses it."""

    def __init__(self, driver, url: str):
        self.driver = driver
        self.url = url

    def open(self) -> ChatPage:
        self.driver.get(self.url)
        self.wait(lambda _: SESSION_RE.search(self.status()), 60)
        return self

    def wait(self, condition, timeout_s: float = TURN_TIMEOUT_S):
        return WebDriverWait(self.driver, timeout_s, poll_frequency=0.2).until(condition)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def status(self) -> str:
        return " ".join(self.find("#status").text.split())

    def session_id(self) -> str:
        return SESSION_RE.search(self.status()).group()

    def box(self):
        return self.find("#message textarea")

    def type_into(self, element, text: str) -> None:
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.BACKSPACE)
        element.send_keys(text)

    def send(self, text: str, with_button: bool = False) -> str:
        """Send a message, wait for the turn to end, and return the page's last bot text."""
        before = len(self.find_all("#chat [data-testid=user]"))
        self.type_into(self.box(), text)
        if with_button:
            self.find("#send").click()
        else:
            self.box().send_keys(Keys.ENTER)
        self.wait(lambda _: len(self.find_all("#chat [data-testid=user]")) > before)
        self.wait(lambda _: "generating" not in self.status())
        return self.bot_texts()[-1]

    def bot_texts(self) -> list[str]:
        return [e.text for e in self.find_all("#chat [data-testid=bot]")]

    def set_number(self, elem_id: str, value: float) -> None:
        """Type into a slider's number box (then leave it, which commits the value)."""
        field = self.find(f"#{elem_id} input[type=number]")
        self.type_into(field, str(value))
        field.send_keys(Keys.TAB)
        self.wait(lambda _: float(field.get_attribute("value")) == value, 10)

    def number(self, elem_id: str) -> float:
        return float(self.find(f"#{elem_id} input[type=number]").get_attribute("value"))

    def toggle_thinking(self) -> None:
        self.find("#thinking input[type=checkbox]").click()

    def new_conversation(self) -> None:
        old = self.session_id()
        self.find("#new-conversation").click()
        self.wait(lambda _: self.session_id() != old, 30)
        self.wait(lambda _: not self.find_all("#chat [data-testid=user]"), 30)

    def screenshot(self, path) -> None:
        assert self.driver.save_screenshot(str(path)), f"could not save {path}"

    def external_requests(self) -> list[str]:
        entries = self.driver.execute_script("return performance.getEntriesByType('resource')")
        return [e["name"] for e in entries if not e["name"].startswith("http://127.0.0.1")]


@pytest.fixture(scope="module")
def stub() -> Iterator[StubOpenAI]:
    with StubOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def stub_url(stub, artifacts) -> Iterator[str]:
    with demo_app(stub.api_base, artifacts, "stub") as url:
        yield url


def test_against_fermi_streams_answers_and_reuses_the_kv_cache(fermi_server, browser, artifacts):
    with demo_app(fermi_server, artifacts, "fermi") as url:
        page = ChatPage(browser, url).open()
        page.set_number("max-tokens", 24)  # random weights: keep the answers short

        first = page.send("Hello! What can you do?")
        assert first.strip(), "no streamed answer appeared"
        assert "⚠️" not in first, first
        assert "0 reused from the session's KV cache" in page.status()
        session = page.session_id()

        page.send("Tell me more.", with_button=True)
        reused = int(re.search(r"(\d+) reused", page.status()).group(1))
        assert reused > 0, f"the second turn reused no KV cache: {page.status()}"
        assert page.session_id() == session

        page.toggle_thinking()  # off: the server renders the prompt without thinking
        assert "⚠️" not in page.send("And now without thinking?")
        assert len(page.find_all("#chat [data-testid=user]")) == 3
        page.screenshot(artifacts / "demo-fermi.png")

        page.new_conversation()
        assert page.session_id() != session
        assert "⚠️" not in page.send("A fresh start.")
        # a new session: at most the template's opening, which earlier requests left in the
        # server's prefix cache, is reused; none of the old conversation
        status = page.status()
        prompt = int(re.search(r"(\d+) prompt tokens", status).group(1))
        assert int(re.search(r"(\d+) reused", status).group(1)) < prompt // 2, status
        assert page.external_requests() == []


def test_thinking_panel_settings_and_sessions(stub, stub_url, browser, artifacts):
    page = ChatPage(browser, stub_url).open()
    stub.requests.clear()
    page.type_into(page.find("#system textarea"), "You are terse.")
    page.set_number("max-tokens", 300)
    page.set_number("top-p", 0.9)

    answer = page.send("Why is the sky blue?")
    assert "".join(ANSWER) in answer
    session = page.session_id()
    sent = stub.requests[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert sent["stream"] is True
    assert (sent["thinking"], sent["session_id"]) == ("on", session)
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (300, 0.6, 0.9)

    # The thinking sits in its own collapsed panel, apart from the answer; a click opens it.
    panel = page.find("#chat .thought-group")
    assert "Thinking" in panel.text
    assert "".join(REASONING) not in panel.text
    panel.find_element(By.CSS_SELECTOR, ".title").click()
    page.wait(lambda _: "".join(REASONING) in page.find("#chat .thought-group").text, 10)
    page.screenshot(artifacts / "demo.png")

    page.toggle_thinking()  # off; the sampling sliders move to Qwen3's non-thinking advice
    page.wait(lambda _: page.number("temperature") == 0.7, 10)
    page.send("Thanks!", with_button=True)
    sent = stub.requests[-1]
    assert (sent["thinking"], sent["session_id"]) == ("off", session)
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][2]["content"] == "".join(ANSWER)
    assert (sent["temperature"], sent["top_p"]) == (0.7, 0.8)
    assert len(page.find_all("#chat .thought-group")) == 1  # no thinking this time

    page.new_conversation()
    assert stub.deleted == [session]  # the old session's KV cache is freed at once
    page.send("Hello again")
    sent = stub.requests[-1]
    assert sent["session_id"] == page.session_id() != session
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


def test_error_answer_is_shown_and_the_app_keeps_working(stub, stub_url, browser, artifacts):
    page = ChatPage(browser, stub_url).open()
    failed = f"{FAIL_WORD}: tell me a secret"
    shown = page.send(failed)
    assert "HTTP 400" in shown and FAIL_MESSAGE in shown, shown
    assert page.box().get_attribute("value") == failed  # given back, ready to send again
    assert "the last request failed" in page.status()

    answer = page.send("Something else, then.")
    assert "".join(ANSWER) in answer
    sent = [m["content"] for m in stub.requests[-1]["messages"]]
    assert failed not in sent and sent[-1] == "Something else, then."
    assert any(FAIL_MESSAGE in text for text in page.bot_texts())  # the error stays in view


def test_server_down_is_a_readable_message(browser, artifacts):
    api_base = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with demo_app(api_base, artifacts, "down") as url:
        page = ChatPage(browser, url).open()
        for attempt in ("Is anyone there?", "Still nobody?"):
            shown = page.send(attempt)
            assert f"Cannot reach the fermi server at {api_base}" in shown, shown
            assert "fermi serve openai" in shown
        assert len([t for t in page.bot_texts() if "Cannot reach" in t]) == 2
        page.screenshot(artifacts / "demo-server-down.png")


def test_new_conversation_stops_a_running_answer(stub, stub_url, browser):
    page = ChatPage(browser, stub_url).open()
    before = stub.disconnects
    page.type_into(page.box(), f"{SLOW_WORD}: tell me everything")
    page.box().send_keys(Keys.ENTER)
    page.wait(lambda _: any("and so on" in text for text in page.bot_texts()), 30)
    page.new_conversation()
    page.wait(lambda _: stub.disconnects > before, 20)  # the demo closed the stream
    assert page.bot_texts() == []


def test_a_model_that_cannot_think_hides_the_switch(browser, artifacts):
    """The page reads /v1/models: no thinking switch for a model that cannot think, its
    requests say thinking off, and max tokens stops at the model's context."""
    card = {"supports_thinking": False, "context_length": 2048, "max_model_len": 2048}
    with StubOpenAI(card) as plain, demo_app(plain.api_base, artifacts, "no-thinking") as url:
        page = ChatPage(browser, url).open()
        page.wait(lambda _: "cannot think" in page.find("#header").text, 30)
        assert "context 2048 tokens" in page.find("#header").text
        assert (
            not page.find_all("#thinking input[type=checkbox]")
            or not page.find("#thinking").is_displayed()
        )
        assert page.number("temperature") == 0.7  # the non-thinking advice
        page.send("Hello")
        sent = plain.requests[-1]
        assert sent["thinking"] == "off" and sent["temperature"] == 0.7
        page.screenshot(artifacts / "demo-no-thinking.png")


def test_against_fermi_the_header_shows_the_models_card(fermi_server, browser):
    with demo_app(fermi_server, ARTIFACTS_DIR, "card") as url:
        page = ChatPage(browser, url).open()
        page.wait(lambda _: "can think" in page.find("#header").text, 30)
        header = " ".join(page.find("#header").text.split())
        assert "model tiny-qwen3 , context 4096 tokens" in header
        assert page.find("#thinking").is_displayed()
