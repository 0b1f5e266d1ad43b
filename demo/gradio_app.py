"""A Gradio chat page for `fermi serve openai` (or any OpenAI-compatible server).

It streams POST /v1/chat/completions through the `openai` client. The model's thinking (the
`reasoning_content` deltas) goes into a collapsible "Thinking" message above the answer. Each
conversation sends one `session_id` (a fermi extension), so the server keeps its KV cache
between turns and prefills only the new turn; "New conversation" starts a new session and frees
the old one. The page is a thin client: it imports nothing from fermi.

    python demo/gradio_app.py [--api-base URL] [--api-key KEY] [--host HOST] [--port PORT]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import gradio as gr
import openai

log = logging.getLogger("fermi.demo")

DEFAULT_API_BASE = "http://127.0.0.1:8000/v1"  # `fermi serve openai` listens on port 8000
THINKING_TITLE = "Thinking"
# Qwen3's sampling advice for each mode (fermi.sampling uses the same numbers as its defaults).
SAMPLING_ADVICE = {True: (0.6, 0.95), False: (0.7, 0.8)}  # thinking -> (temperature, top_p)


@dataclass(frozen=True)
class Config:
    api_base: str
    api_key: str | None
    model: str | None
    host: str
    port: int


def parse_args(argv: list[str] | None = None, environ=os.environ) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--api-base",
        default=environ.get("FERMI_API_BASE") or DEFAULT_API_BASE,
        help=f"the server's OpenAI base URL [env FERMI_API_BASE; default {DEFAULT_API_BASE}]",
    )
    parser.add_argument(
        "--api-key",
        default=environ.get("FERMI_API_KEY"),
        help="bearer key, when the server was started with one [env FERMI_API_KEY]",
    )
    parser.add_argument("--model", help="model id to request [default: the server's first model]")
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on")
    parser.add_argument("--port", type=int, default=7860, help="port the page listens on")
    args = parser.parse_args(argv)
    return Config(args.api_base.rstrip("/"), args.api_key, args.model, args.host, args.port)


# -- talking to the server -------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The settings panel, as one request's parameters."""

    system_prompt: str = ""
    thinking: bool = True
    max_tokens: int = 0  # 0: no limit, the server runs the answer to the end of the context
    temperature: float = 0.6
    top_p: float = 0.95


@dataclass
class Turn:
    """One exchange as it streams in."""

    user: str
    reasoning: str = ""
    answer: str = ""
    thinking_s: float | None = None  # how long the model thought, once its answer began
    finish_reason: str | None = None
    usage: Any = None  # the stream's final usage (prompt, cached and generated tokens)
    error: str | None = None
    done: bool = False


@dataclass(frozen=True)
class ModelCard:
    """What the server says about its model in GET /v1/models (fermi's fields beside OpenAI's;
    a server without them gets the permissive defaults)."""

    id: str
    context_length: int | None = None
    supports_thinking: bool = True


def read_card(entry: Any) -> ModelCard:
    """A ModelCard from one `client.models.list()` entry (extra fields live in model_extra)."""
    extra = getattr(entry, "model_extra", None) or {}
    context = extra.get("context_length") or extra.get("max_model_len")
    thinking = extra.get("supports_thinking")
    return ModelCard(
        entry.id,
        int(context) if context else None,
        True if thinking is None else bool(thinking),
    )


def new_session_id() -> str:
    return f"gradio-{uuid.uuid4().hex}"


@dataclass
class Chat:
    """One browser tab's conversation: what the server is sent, and what the page shows."""

    session_id: str = field(default_factory=new_session_id)
    messages: list[dict[str, Any]] = field(default_factory=list)  # user/assistant, no system
    view: list[dict[str, Any]] = field(default_factory=list)  # Chatbot messages, errors included


def chat_body(model: str, chat: Chat, user: str, options: Options) -> dict[str, Any]:
    """The create() arguments for one turn: the whole conversation (as OpenAI clients send it),
    plus the session that lets the server skip prefilling what it has already seen."""
    system = options.system_prompt.strip()
    messages = [{"role": "system", "content": system}] if system else []
    messages += chat.messages + [{"role": "user", "content": user}]
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": float(options.temperature),
        "top_p": float(options.top_p),
        "extra_body": {
            "thinking": "on" if options.thinking else "off",
            "session_id": chat.session_id,
        },
    }
    if options.max_tokens:  # else the server's default: the rest of the context
        body["max_tokens"] = int(options.max_tokens)
    return body


def describe_error(error: Exception, api_base: str) -> str:
    """A sentence a person can act on, for anything the request or its stream raised."""
    if isinstance(error, openai.APIConnectionError):  # refused, unreachable or timed out
        reason = str(error.__cause__ or error).strip() or type(error).__name__
        return (
            f"Cannot reach the fermi server at {api_base}: {reason}. Start it with "
            "`fermi serve openai`, or point the demo at it with --api-base or FERMI_API_BASE."
        )
    body = getattr(error, "body", None)
    detail = body.get("message") if isinstance(body, dict) else None
    detail = detail or str(error)
    if isinstance(error, openai.APIStatusError):
        return f"The server refused the request (HTTP {error.status_code}): {detail}"
    if isinstance(error, openai.APIError):  # an error event in the middle of the stream
        return f"The server stopped with an error: {detail}"
    return f"Unexpected error: {type(error).__name__}: {error}"


class Backend:
    """The server, through the openai client."""

    def __init__(self, config: Config):
        self.api_base = config.api_base
        self.client = openai.OpenAI(
            base_url=config.api_base,
            api_key=config.api_key or "unused",  # the client insists on one
            max_retries=0,  # a person is waiting: say at once that the server is down
            timeout=openai.Timeout(600.0, connect=5.0),
        )
        self.configured_model = config.model
        self.model = config.model

    def model_id(self) -> str:
        if self.model is None:
            self.model = self.client.models.list().data[0].id
        return self.model

    def card(self) -> ModelCard | None:
        """The requested model's card (the configured one, else the server's first); None when
        the server cannot be asked."""
        try:
            entries = self.client.models.list().data
        except openai.APIError as e:
            log.warning("cannot list the server's models: %s", e)
            return None
        chosen = [e for e in entries if e.id == self.configured_model] or entries[:1]
        return read_card(chosen[0]) if chosen else None

    def stream(self, chat: Chat, user: str, options: Options) -> Iterator[Turn]:
        """Yield a snapshot of the turn after every chunk; errors end it with `error` set,
        never raise."""
        turn = Turn(user)
        try:
            body = chat_body(self.model_id(), chat, user, options)
            started = time.monotonic()
            # Leaving the block early (the page cancelled us) closes the response, and fermi
            # then stops generating within one decode step.
            with self.client.chat.completions.create(**body) as chunks:
                for chunk in chunks:
                    add_chunk(turn, chunk, started)
                    yield replace(turn)
        except Exception as e:
            log.warning("chat request failed: %s", e)
            turn.error = describe_error(e, self.api_base)
            if isinstance(e, openai.NotFoundError):  # perhaps restarted with another model
                self.model = self.configured_model
        turn.done = True
        yield turn

    def forget(self, session_id: str) -> None:
        """Free a finished conversation's KV cache now rather than at its TTL (best effort)."""
        try:
            self.client.delete(f"/sessions/{session_id}", cast_to=object)
        except openai.APIError as e:  # never used (404), the server is down, ...: no matter
            log.info("could not delete session %s: %s", session_id, e)


def add_chunk(turn: Turn, chunk: Any, started: float) -> None:
    if chunk.usage is not None:
        turn.usage = chunk.usage
    for choice in chunk.choices:
        delta = choice.delta
        reasoning = getattr(delta, "reasoning_content", None)  # fermi's (and vLLM's) extra
        if reasoning:
            turn.reasoning += reasoning
        if delta.content:
            if turn.reasoning and turn.thinking_s is None:
                turn.thinking_s = time.monotonic() - started
            turn.answer += delta.content
        if choice.finish_reason:
            turn.finish_reason = choice.finish_reason


# -- what the page shows ---------------------------------------------------------------------


def turn_view(turn: Turn) -> list[dict[str, Any]]:
    """The Chatbot messages of one turn: the user's, a thinking panel, the answer or an error."""
    view: list[dict[str, Any]] = [{"role": "user", "content": turn.user}]
    if turn.reasoning:
        thinking_done = turn.done or turn.thinking_s is not None
        metadata: dict[str, Any] = {"title": THINKING_TITLE}
        metadata["status"] = "done" if thinking_done else "pending"
        if turn.thinking_s is not None:
            metadata["duration"] = round(turn.thinking_s, 1)
        view.append({"role": "assistant", "content": turn.reasoning, "metadata": metadata})
    if turn.answer:
        view.append({"role": "assistant", "content": turn.answer})
    elif turn.done and not turn.error and turn.finish_reason == "length":
        note = (
            "_(Max tokens or the end of the context was reached before the answer began: raise "
            "max tokens, or start a new conversation.)_"
        )
        view.append({"role": "assistant", "content": note})
    if turn.error:
        view.append({"role": "assistant", "content": f"⚠️ {turn.error}"})
    return view


def status_line(chat: Chat, turn: Turn | None = None) -> str:
    parts = [f"Session `{chat.session_id}`"]
    if turn is not None and not turn.done:
        parts.append("generating…")
    elif turn is not None and turn.error:
        parts.append("the last request failed")
    elif turn is not None and turn.usage is not None:
        usage = turn.usage
        details = usage.prompt_tokens_details
        cached = (details.cached_tokens if details else None) or 0
        parts.append(
            f"{usage.prompt_tokens} prompt tokens, {cached} reused from the session's KV cache"
        )
        parts.append(f"{usage.completion_tokens} generated")
        if turn.finish_reason:
            parts.append(f"finish: {turn.finish_reason}")
    return " · ".join(parts)


def finish_turn(chat: Chat, turn: Turn) -> Chat:
    """The conversation after a turn: a failed one stays on the page but is not resent."""
    view = chat.view + turn_view(turn)
    if turn.error:
        return Chat(chat.session_id, chat.messages, view)
    reply: dict[str, Any] = {"role": "assistant", "content": turn.answer}
    if turn.reasoning:
        reply["reasoning_content"] = turn.reasoning  # the chat template decides whether to keep it
    messages = chat.messages + [{"role": "user", "content": turn.user}, reply]
    return Chat(chat.session_id, messages, view)


# -- the page --------------------------------------------------------------------------------


def respond(backend: Backend, text: str, chat: Chat, *settings: Any) -> Iterator[tuple]:
    """The send handler. Every yield is (chatbot, chat state, message box, status line): one
    shape for the streaming, the success and the error paths alike."""
    user = (text or "").strip()
    if not user:
        yield chat.view, chat, text, status_line(chat)
        return
    options = Options(*settings)
    yield chat.view + turn_view(Turn(user)), chat, "", status_line(chat, Turn(user))
    for turn in backend.stream(chat, user, options):
        if not turn.done:
            yield chat.view + turn_view(turn), chat, "", status_line(chat, turn)
    chat = finish_turn(chat, turn)
    retry_text = text if turn.error else ""  # give a failed message back, to send again
    yield chat.view, chat, retry_text, status_line(chat, turn)


def new_conversation(backend: Backend, chat: Chat) -> tuple:
    """(chatbot, chat state, status line) for a fresh session; the old one is freed."""
    if chat.messages:
        backend.forget(chat.session_id)
    fresh = Chat()
    return fresh.view, fresh, status_line(fresh)


def advised_sampling(thinking: bool) -> tuple[float, float]:
    return SAMPLING_ADVICE[bool(thinking)]


def model_line(card: ModelCard | None, api_base: str) -> str:
    if card is None:
        return f"## fermi chat\nTalking to `{api_base}`."
    facts = [f"model `{card.id}`"]
    if card.context_length:
        facts.append(f"context {card.context_length} tokens")
    facts.append("can think" if card.supports_thinking else "cannot think")
    return f"## fermi chat\nTalking to `{api_base}`: " + ", ".join(facts) + "."


def controls_for(card: ModelCard | None, thinking: bool) -> tuple[dict, dict, dict, dict]:
    """Updates for (thinking, temperature, top p, max tokens) from the model's card: a model
    that cannot think gets the switch off and hidden (and the non-thinking sampling advice);
    max tokens stops at the context length (0, no limit, stays the default)."""
    if card is None:
        return gr.update(), gr.update(), gr.update(), gr.update()
    thinking = thinking and card.supports_thinking
    temperature, top_p = advised_sampling(thinking)
    limit = gr.update()
    if card.context_length:
        default = Options().max_tokens
        limit = gr.update(maximum=card.context_length, value=min(default, card.context_length))
    return (
        gr.update(value=thinking, visible=card.supports_thinking),
        gr.update(value=temperature),
        gr.update(value=top_p),
        limit,
    )


def build_app(config: Config) -> gr.Blocks:
    backend = Backend(config)
    defaults = Options()
    with gr.Blocks(title="fermi chat", analytics_enabled=False) as app:
        header = gr.Markdown(model_line(None, config.api_base), elem_id="header")
        chat = gr.State(lambda: Chat())  # called on every page load: a new session per tab
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation", elem_id="chat", height=560, buttons=["copy"]
                )
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        elem_id="message",
                        scale=5,
                        autofocus=True,
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1, min_width=260):
                thinking = gr.Checkbox(
                    value=defaults.thinking,
                    label="Thinking",
                    info="Let the model reason first; its thinking shows in a collapsible panel.",
                    elem_id="thinking",
                )
                system = gr.Textbox(
                    label="System prompt", lines=3, value=defaults.system_prompt, elem_id="system"
                )
                max_tokens = gr.Slider(
                    0, 8192, value=defaults.max_tokens, step=1, label="Max tokens",
                    info="0: no limit, the answer may run to the end of the context.",
                    elem_id="max-tokens",
                )  # fmt: skip
                temperature = gr.Slider(
                    0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                    info="0 is greedy; the Thinking switch sets Qwen3's advice.",
                    elem_id="temperature",
                )  # fmt: skip
                top_p = gr.Slider(
                    0.05, 1.0, value=defaults.top_p, step=0.05, label="Top p", elem_id="top-p"
                )
                new = gr.Button("New conversation", elem_id="new-conversation")

        settings = [system, thinking, max_tokens, temperature, top_p]  # Options' field order
        outputs = [chatbot, chat, message, status]

        def on_send(text, chat_state, *values):
            yield from respond(backend, text, chat_state, *values)

        sent = [
            message.submit(on_send, [message, chat, *settings], outputs),
            send.click(on_send, [message, chat, *settings], outputs),
        ]

        def on_new(chat_state):
            return new_conversation(backend, chat_state)

        # Stop a running answer first, then reset: a reset in the same event as the cancel
        # can be overwritten by the cancelled answer's last update.
        for trigger in (new.click, chatbot.clear):
            trigger(None, None, None, cancels=sent).then(on_new, [chat], [chatbot, chat, status])
        thinking.change(advised_sampling, [thinking], [temperature, top_p])
        app.load(status_line, [chat], [status])

        def on_load(thinking_now):
            card = backend.card()
            return (model_line(card, config.api_base), *controls_for(card, thinking_now))

        app.load(on_load, [thinking], [header, thinking, temperature, top_p, max_tokens])
    return app


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    config = parse_args(argv)
    app = build_app(config)
    app.queue(default_concurrency_limit=8)  # the server queues and batches; let it
    app.launch(server_name=config.host, server_port=config.port, share=False, ssr_mode=False)


if __name__ == "__main__":
    main()
