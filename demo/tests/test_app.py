"""The demo's logic without a browser: settings, request bodies, streaming into turns, and the
error paths, through the real openai client against the stub server or a closed port."""

from __future__ import annotations

from dataclasses import astuple

import gradio_app as app
import pytest
from demo_processes import free_port
from stub_server import (
    ANSWER,
    BREAK_MESSAGE,
    BREAK_WORD,
    FAIL_MESSAGE,
    FAIL_WORD,
    REASONING,
    StubOpenAI,
)


@pytest.fixture(scope="module")
def stub():
    with StubOpenAI() as server:
        yield server


def backend_for(api_base: str) -> app.Backend:
    return app.Backend(app.parse_args(["--api-base", api_base], environ={}))


def test_defaults_point_at_fermis_real_port():
    config = app.parse_args([], environ={})
    assert config.api_base == "http://127.0.0.1:8000/v1"
    assert (config.api_key, config.model) == (None, None)
    assert (config.host, config.port) == ("127.0.0.1", 7860)


def test_environment_then_flags_override_the_defaults():
    env = {"FERMI_API_BASE": "http://10.0.0.5:9000/v1/", "FERMI_API_KEY": "from-env"}
    config = app.parse_args([], environ=env)
    assert (config.api_base, config.api_key) == ("http://10.0.0.5:9000/v1", "from-env")
    flags = ["--api-base", "http://127.0.0.1:8001/v1", "--api-key", "k", "--port", "9999"]
    config = app.parse_args([*flags, "--host", "0.0.0.0", "--model", "m"], environ=env)
    assert (config.api_base, config.api_key, config.port) == ("http://127.0.0.1:8001/v1", "k", 9999)
    assert (config.host, config.model) == ("0.0.0.0", "m")


def test_the_api_key_is_sent_as_a_bearer_token(stub):
    config = app.parse_args(["--api-base", stub.api_base], environ={"FERMI_API_KEY": "sekret"})
    list(app.Backend(config).stream(app.Chat(), "hi", app.Options()))
    assert stub.authorizations[-1] == "Bearer sekret"


def test_chat_body_carries_the_session_thinking_and_settings():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat = app.Chat(messages=history)
    options = app.Options("  Be brief.  ", False, 64.0, 0.2, 0.5)
    body = app.chat_body("m", chat, "next", options)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        *chat.messages,
        {"role": "user", "content": "next"},
    ]
    assert body["extra_body"] == {"thinking": "off", "session_id": chat.session_id}
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (64, 0.2, 0.5)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    default = app.chat_body("m", chat, "x", app.Options())
    assert default["messages"][0]["role"] == "user"
    assert "max_tokens" not in default  # 0, the default: the server's, the rest of the context


def test_each_chat_gets_its_own_session():
    assert app.Chat().session_id != app.Chat().session_id


def test_a_streamed_turn_splits_thinking_from_the_answer(stub):
    turns = list(backend_for(stub.api_base).stream(app.Chat(), "why?", app.Options()))
    first_thought = next(t for t in turns if t.reasoning and not t.answer)
    panel = app.turn_view(first_thought)[1]
    assert panel["metadata"] == {"title": "Thinking", "status": "pending"}

    final = turns[-1]
    assert final.done and final.error is None and final.finish_reason == "stop"
    assert (final.reasoning, final.answer) == ("".join(REASONING), "".join(ANSWER))
    assert final.usage.completion_tokens == 12
    user, thinking, answer = app.turn_view(final)
    assert user == {"role": "user", "content": "why?"}
    assert thinking["metadata"]["status"] == "done" and thinking["metadata"]["duration"] >= 0
    assert answer == {"role": "assistant", "content": "".join(ANSWER)}


def test_a_finished_turn_is_resent_with_its_reasoning():
    turn = app.Turn("q", reasoning="r", answer="a", done=True)
    chat = app.finish_turn(app.Chat(), turn)
    assert chat.messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
    ]
    assert len(chat.view) == 3


def test_running_out_of_tokens_while_thinking_says_so():
    turn = app.Turn("q", reasoning="hmm", finish_reason="length", done=True)
    assert "Max tokens" in app.turn_view(turn)[-1]["content"]


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        (FAIL_WORD, f"The server refused the request (HTTP 400): {FAIL_MESSAGE}"),
        (BREAK_WORD, f"The server stopped with an error: {BREAK_MESSAGE}"),
    ],
)
def test_error_answers_become_messages_and_are_not_resent(stub, word, expected):
    backend = backend_for(stub.api_base)
    chat = app.Chat()
    outputs = list(app.respond(backend, f"{word} now", chat, *astuple(app.Options())))
    assert all(len(out) == 4 for out in outputs)  # chatbot, state, message box, status
    view, after, box, status = outputs[-1]
    assert view[-1]["content"] == f"⚠️ {expected}"
    assert after.messages == [] and after.session_id == chat.session_id
    assert box == f"{word} now" and "failed" in status


def test_server_down_is_a_message_not_an_exception():
    api_base = f"http://127.0.0.1:{free_port()}/v1"
    outputs = list(app.respond(backend_for(api_base), "hi", app.Chat(), *astuple(app.Options())))
    assert all(len(out) == 4 for out in outputs)
    message = outputs[-1][0][-1]["content"]
    assert message.startswith(f"⚠️ Cannot reach the fermi server at {api_base}: ")
    assert "refused" in message.lower()


def test_an_empty_message_sends_nothing(stub):
    before = len(stub.requests)
    chat = app.Chat()
    assert list(app.respond(backend_for(stub.api_base), "  ", chat)) == [
        ([], chat, "  ", app.status_line(chat))
    ]
    assert len(stub.requests) == before


def test_new_conversation_frees_the_old_session_only_when_it_was_used(stub):
    backend = backend_for(stub.api_base)
    stub.deleted.clear()
    unused = app.Chat()
    app.new_conversation(backend, unused)
    used = app.finish_turn(app.Chat(), app.Turn("q", answer="a", done=True))
    view, fresh, status = app.new_conversation(backend, used)
    assert stub.deleted == [used.session_id]
    assert view == [] and fresh.messages == [] and fresh.session_id in status


def test_thinking_switch_sets_qwens_sampling_advice():
    assert app.advised_sampling(True) == (0.6, 0.95)
    assert app.advised_sampling(False) == (0.7, 0.8)


def test_the_model_card_drives_the_controls():
    class Entry:
        id = "m"
        model_extra = {"supports_thinking": False, "max_model_len": 512}

    card = app.read_card(Entry())
    assert card == app.ModelCard("m", 512, False)
    thinking, temperature, top_p, max_tokens = app.controls_for(card, thinking=True)
    assert thinking["visible"] is False and thinking["value"] is False
    assert (temperature["value"], top_p["value"]) == app.advised_sampling(False)
    assert max_tokens["maximum"] == 512 and max_tokens["value"] == 0  # 0: no limit
    plain = app.read_card(type("Plain", (), {"id": "x", "model_extra": {}})())
    assert plain.supports_thinking is True  # a server without the field: keep the switch
    assert app.controls_for(plain, thinking=True)[0]["visible"] is True


def test_the_card_comes_from_the_server(stub):
    card = backend_for(stub.api_base).card()
    assert card is not None and card.id == "stub-model"
    assert backend_for(f"http://127.0.0.1:{free_port()}/v1").card() is None
