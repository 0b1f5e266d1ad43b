"""`fermi chat`: an interactive REPL over the runtime, or a line-per-prompt filter when stdin is
not a terminal. Reasoning is shown dimmed, apart from the answer."""

from __future__ import annotations

import queue
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console

from fermi.chat_template import parse_thinking
from fermi.errors import FermiError
from fermi.requests import Finished, GenerationRequest, Message, SamplingParams, TextDelta, Thinking
from fermi.runtime import Generation, Runtime
from fermi.sessions import new_session_id

HELP = """commands:
  /help                 show this help
  /reset                forget the conversation (and its KV cache)
  /thinking on|off|auto switch thinking mode
  /system TEXT          set the system prompt (empty TEXT clears it) and start over
  /exit                 quit (Ctrl-D works too; Ctrl-C stops an answer)
input:
  \"\"\"                   starts a multi-line message; a line ending in \"\"\" ends it
  a line ending in \\     continues the message on the next line
  arrow keys edit the line; Up and Down recall earlier lines"""
NO_THINKING = "this model has no thinking mode; thinking stays off"
PROMPT, CONTINUATION = ">>> ", "... "


@dataclass
class ChatOptions:
    max_new_tokens: int | None = None  # None: the runtime's default (the rest of the context)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    thinking: Thinking | None = None
    system: str | None = None


class ChatSession:
    """One conversation: a runtime session id plus the pending system prompt."""

    def __init__(self, runtime: Runtime, options: ChatOptions):
        self.runtime = runtime
        self.options = options
        self.session_id = new_session_id()
        self.send_system = bool(options.system)

    def thinking_warning(self) -> str | None:
        """NO_THINKING when thinking was just asked "on" (--thinking or /thinking) for a model
        without a thinking mode (the runtime then renders the prompt without it); else None.
        Said when asked, not at every answer."""
        if self.options.thinking == "on" and not self.runtime.info.supports_thinking:
            return NO_THINKING
        return None

    def reset(self) -> None:
        try:
            self.runtime.reset_session(self.session_id)
        except FermiError:
            pass  # nothing said yet, nothing to forget
        self.session_id = new_session_id()
        self.send_system = bool(self.options.system)

    def request(self, prompt: str) -> GenerationRequest:
        messages = [Message("user", prompt)]
        if self.send_system:
            messages.insert(0, Message("system", self.options.system or ""))
        return GenerationRequest(
            messages=messages,
            max_new_tokens=self.options.max_new_tokens,
            sampling=self.options.sampling,
            thinking=self.options.thinking,
            session_id=self.session_id,
            append=True,
        )

    def ask(self, prompt: str, on_delta) -> Finished:
        """Stream one answer through `on_delta`; Ctrl-C cancels it and keeps what was said.
        Generation runs in a worker thread; the main thread relays its events."""
        generation = self.runtime.submit(self.request(prompt))
        self.send_system = False
        events: queue.Queue = queue.Queue()

        def pump() -> None:
            try:
                for event in generation:
                    events.put(event)
            except BaseException as e:
                events.put(e)

        with interrupts_cancel(generation):
            threading.Thread(target=pump, daemon=True).start()
            while not isinstance(event := events.get(), Finished):
                if isinstance(event, BaseException):
                    raise event
                on_delta(event)
            return event


@contextmanager
def interrupts_cancel(generation: Generation) -> Iterator[None]:
    """While an answer streams, Ctrl-C only asks the runtime to stop it, and the answer ends
    with its Finished event as usual. A KeyboardInterrupt raised at an arbitrary point of the
    relay loop could land inside the event queue's lock and leave the worker thread blocked on
    it for good. Signal handlers belong to the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: generation.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def line_reader(console: Console):
    """input() with line editing and history: the readline module, where Python has one, puts
    the terminal out of canonical mode, so a pasted line is not cut at the tty's 4095-byte line
    limit, arrow keys edit the line, and Up recalls earlier lines. The prompt goes to input()
    itself (its colour codes marked as zero-width for readline) so that redrawing a long line
    keeps it."""
    try:
        import readline  # noqa: F401  (importing it is what enables it for input())
    except ImportError:  # a Python built without it: plain input()
        pass

    def read(prompt: str) -> str:
        if console.is_terminal and console.color_system:
            prompt = f"\001\033[1;32m\002{prompt}\001\033[0m\002"
        return input(prompt)

    return read


def read_message(read) -> str:
    """One user message from `read(prompt)`: a line; or, as in Ollama, lines between triple
    quotes (a line starting with \"\"\" opens the block, one ending with \"\"\" closes it); or,
    as in llama.cpp's CLI, lines ending in a backslash joined with the next. Raises EOFError
    and KeyboardInterrupt from `read`."""
    line = read(PROMPT)
    if line.lstrip().startswith('"""'):
        text, lines = line.lstrip()[3:], []
        while not text.rstrip().endswith('"""'):
            lines.append(text)
            text = read(CONTINUATION)
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(CONTINUATION)
    return "\n".join([*lines, line])


def run_interactive(chat: ChatSession, console: Console) -> None:
    console.print(f"[bold]fermi chat[/bold] · {chat.runtime.model_id} · /help for commands")
    read = line_reader(console)
    while True:
        try:
            line = read_message(read)
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(line, chat, console):
                return
            continue
        show = Printer(console, chat.runtime.context_length)
        try:
            finished = chat.ask(line, show)
        except FermiError as e:
            console.print(f"[red]error:[/red] {e}")
            continue
        except KeyboardInterrupt:  # while the prompt was prepared: nothing ran yet
            console.print("\n[yellow](stopped)[/yellow]")
            continue
        show.end(finished)


class Printer:
    """Writes deltas as they come: reasoning dimmed, answer plain."""

    def __init__(self, console: Console, context_length: int | None = None):
        self.console = console
        self.context_length = context_length
        self.kind: str | None = None

    def __call__(self, delta: TextDelta) -> None:
        if delta.kind != self.kind and self.kind == "reasoning":
            self.console.print()
        self.kind = delta.kind
        style = "dim italic" if delta.kind == "reasoning" else None
        self.console.print(delta.text, style=style, end="", markup=False, highlight=False)

    def end(self, finished: Finished) -> None:
        self.console.print()
        if finished.finish_reason == "cancelled":
            self.console.print("[yellow](stopped)[/yellow]")
        elif finished.finish_reason == "timeout":
            self.console.print("[yellow](time limit reached)[/yellow]")
        elif finished.finish_reason == "length" and self._context_full(finished):
            self.console.print("[yellow](context full)[/yellow]")
        elif finished.finish_reason == "length":
            self.console.print("[yellow](max tokens reached)[/yellow]")
        if finished.dropped_turns:
            self.console.print(
                f"[yellow](dropped {finished.dropped_turns} oldest messages to fit the "
                "context)[/yellow]"
            )

    def _context_full(self, finished: Finished) -> bool:
        """The answer ran to the end of the context, not to a token limit."""
        return self.context_length is not None and (
            finished.usage.total_tokens >= self.context_length
        )


def handle_command(line: str, chat: ChatSession, console: Console) -> bool:
    """Run a slash command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        console.print(HELP, markup=False)
    elif name == "/reset":
        chat.reset()
        console.print("(conversation cleared)")
    elif name == "/thinking":
        try:
            chat.options.thinking = parse_thinking(arg)
            console.print(f"(thinking {chat.options.thinking})")
            if warning := chat.thinking_warning():
                console.print(f"[yellow]{warning}[/yellow]")
        except FermiError as e:
            console.print(f"[red]error:[/red] {e}")
    elif name == "/system":
        chat.options.system = arg or None
        chat.reset()
        console.print(
            "(system prompt set; conversation cleared)" if arg else "(system prompt cleared)"
        )
    else:
        console.print(f"[red]unknown command {name}[/red]; /help lists them")
    return True


class AnswerCollector:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def __call__(self, delta: TextDelta) -> None:
        if delta.kind == "answer":
            self.parts.append(delta.text)


def run_pipe(chat: ChatSession, lines, out) -> int:
    """Scripts: one prompt per input line, one answer per output line (reasoning left out)."""
    for line in lines:
        prompt = line.strip()
        if not prompt:
            continue
        answer = AnswerCollector()
        chat.ask(prompt, answer)
        out.write("".join(answer.parts).strip() + "\n")
        out.flush()
    return 0


def main(runtime: Runtime, options: ChatOptions) -> int:
    chat = ChatSession(runtime, options)
    if warning := chat.thinking_warning():
        print(warning, file=sys.stderr)
    if sys.stdin.isatty():
        run_interactive(chat, Console(highlight=False))
        return 0
    return run_pipe(chat, sys.stdin, sys.stdout)
