"""POST /v1/completions (OpenAI's legacy text completions) and the tokenizer routes:
parsing into the runtime's raw-prompt GenerationRequest, and every body and chunk they send.

The prompt is a string, a list of token ids, or a list of those: a batch, where each prompt is
its own generation, all submitted at once and decoded in the same batch, and choice `index` runs
prompt by prompt (`prompt * n + i`), as OpenAI's and vLLM's do. `suffix` renders a
fill-in-the-middle prompt when the model's vocabulary has FIM tokens (fermi/fim.py). `echo` puts
the prompt before the completion; with `logprobs` too, the prompt tokens' logprobs come first
(the first token's are null: nothing predicts it). `max_tokens` defaults to 16, as OpenAI's
does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fermi.errors import InvalidRequest
from fermi.openai_server.errors import ApiError
from fermi.openai_server.field_policy import UNKNOWN, check_fields, first_unknown
from fermi.openai_server.formatters import (
    DONE,
    FINGERPRINT,
    Meta,
    RunningUsage,
    chat_usage,
    error_body,
    running_usage,
    sse,
)
from fermi.openai_server.logprobs import LegacyLogprobs, merge_legacy
from fermi.openai_server.schemas import (
    CHAT_ROLES,
    Fields,
    _choices,
    _common_options,
    _message,
    _sampling,
    _stop,
    _stream_options,
    _thinking,
)
from fermi.requests import (
    Event,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    TextDelta,
    Thinking,
    Usage,
)
from fermi.sampling import MAX_LOGPROBS
from fermi.token_text import TokenText

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default
# Prompts in one request. Each takes a row of the batch or a place in the queue (16 and 64 by
# default), and a batch is queued whole or not at all: the bound keeps one request from filling
# a default server's queue.
MAX_PROMPTS = 32


@dataclass(frozen=True)
class CompletionCall:
    model: str | None
    stream: bool
    include_usage: bool
    echo: bool
    prompts: list[str | list[int]]  # before any FIM rendering; one or more
    suffix: str | None
    generation: GenerationRequest
    continuous_usage: bool = False  # every chunk carries the usage so far (vLLM)


def parse_completions(body: dict[str, Any]) -> CompletionCall:
    f = Fields(body)
    prompts = _prompts(f.raw("prompt"))
    logprobs = f.integer("logprobs", minimum=0)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    echo = bool(f.boolean("echo"))
    suffix = f.string("suffix") or None
    if suffix is not None and not all(isinstance(prompt, str) for prompt in prompts):
        raise InvalidRequest("suffix needs a text prompt", param="suffix")
    n = _choices(f)
    best_of = f.integer("best_of", minimum=1)
    if best_of not in (None, 1, n):
        raise InvalidRequest(f"best_of must equal n ({n}), got {best_of}", param="best_of")
    include_usage, continuous_usage = _stream_options(f, usage=True)
    max_tokens = _max_tokens(f, echo)
    # Echo scores the prompt; with max_tokens 0 that is the whole answer, even without logprobs.
    prompt_logprobs = (0 if logprobs is None and max_tokens == 0 else logprobs) if echo else None
    _common_options(f)
    call = CompletionCall(
        model=f.string("model"),
        stream=bool(f.boolean("stream")),
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        echo=echo,
        prompts=prompts,
        suffix=suffix,
        generation=GenerationRequest(
            messages=[],
            prompt=prompts[0],  # the request of each prompt is this one with its prompt
            max_new_tokens=max_tokens,
            sampling=_sampling(f),
            stop=_stop(f),
            ignore_eos=bool(f.boolean("ignore_eos")),
            n=n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        ),
    )
    check_fields(body, f.used, "completions")
    return call


def _max_tokens(f: Fields, echo: bool) -> int:
    """max_tokens, 16 when absent; 0 only with echo (score the prompt, generate nothing: what
    lm-eval's loglikelihood sends)."""
    value = f.integer("max_tokens", minimum=0 if echo else 1)
    return DEFAULT_MAX_TOKENS if value is None else value


def _prompts(value: Any) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a string or an array of token ids is one; an array of
    those is a batch of at most MAX_PROMPTS. Raises InvalidRequest naming `prompt`."""
    if value is None:
        raise InvalidRequest("prompt is required", param="prompt")
    batch = isinstance(value, list) and bool(value) and isinstance(value[0], str | list)
    prompts = value if batch else [value]
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(
            f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}",
            param="prompt",
        )
    for i, prompt in enumerate(prompts):
        if not _one_prompt(prompt):
            where = f"prompt[{i}]" if batch else "prompt"
            raise InvalidRequest(
                f"{where} must be a string or an array of token ids", param="prompt"
            )
    return prompts


def _one_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    )


# -- bodies ----------------------------------------------------------------------------------


def completion_usage(finished: Finished) -> dict[str, Any]:
    usage = chat_usage(finished.usage)
    del usage["completion_tokens_details"]
    return usage


@dataclass
class ChoiceState:
    """One choice's logprobs builder (its text offsets run on across chunks); None when the
    request asked for no logprobs."""

    index: int
    logprobs: LegacyLogprobs | None


class CompletionFrames:
    """Builds /v1/completions bodies: `prefix` (the echoed prompt) and `text` per delta feed a
    ChoiceState per choice (`n` per prompt, choice `prompt * n + i`); `body` and the stream
    frames read them."""

    def __init__(self, meta: Meta, call: CompletionCall, text: TokenText, prompt_texts: list[str]):
        self.meta = meta
        self.call = call
        self.prompt_texts = prompt_texts
        self.n = call.generation.n
        wants = call.generation.logprobs is not None
        self.choices = [
            ChoiceState(i, LegacyLogprobs(text) if wants else None)
            for i in range(len(prompt_texts) * self.n)
        ]
        self.prompt_blocks: dict[int, dict[str, Any]] = {}

    def prompt(self, event: PromptLogprobs | None) -> None:
        """Remember an echoed prompt's logprobs (each of its choices starts with them)."""
        if event is not None and self.choices[0].logprobs is not None:
            self.prompt_blocks[event.prompt] = LegacyLogprobs(self.choices[0].logprobs.text).block(
                event.logprobs, event.token_ids
            )

    def start_choice(self, choice: ChoiceState) -> tuple[str, dict[str, Any] | None]:
        """The echo: the choice's prompt text and logprobs, once per choice."""
        if not self.call.echo:
            return "", None
        prompt = choice.index // self.n
        text = self.prompt_texts[prompt]
        if choice.logprobs is not None:
            choice.logprobs.offset = len(text)
        return text, self.prompt_blocks.get(prompt)

    def delta(self, delta: TextDelta) -> tuple[ChoiceState, dict[str, Any] | None]:
        choice = self.choices[delta.index]
        block = None
        if choice.logprobs is not None:
            block = choice.logprobs.block(delta.logprobs, [t.id for t in delta.logprobs])
        return choice, block

    def choice_body(
        self, index: int, text: str, block: dict[str, Any] | None, finish: str | None
    ) -> dict[str, Any]:
        wants = self.choices[index].logprobs is not None
        return {"index": index, "text": text, "logprobs": block if wants else None,
                "finish_reason": finish}  # fmt: skip

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            **extra,
        }

    def body(self, events: list, finished: Finished) -> dict[str, Any]:
        """The non-streaming body from all of a generation's events (the prompts' logprobs,
        when asked, come before any text)."""
        for event in events:
            if isinstance(event, PromptLogprobs):
                self.prompt(event)
        texts: list[list[str]] = []
        blocks: list[list[dict[str, Any]]] = []
        for choice in self.choices:
            text, block = self.start_choice(choice)
            texts.append([text])
            blocks.append([block] if block else [])
        for event in events:
            if isinstance(event, TextDelta):
                choice, block = self.delta(event)
                texts[choice.index].append(event.text)
                blocks[choice.index].extend([block] if block else [])
        reasons = finished.finish_reasons or [finished.finish_reason]
        choices = [
            self.choice_body(i, "".join(texts[i]), merge_legacy(blocks[i]), _reason(reasons, i))
            for i in range(len(self.choices))
        ]
        return self.envelope(choices, usage=completion_usage(finished))


def _reason(reasons: list[str], index: int) -> str:
    return reasons[index] if index < len(reasons) else "stop"


class CompletionStream:
    """SSE frames of a streamed completion: text chunks (choice `index` on each), one finish
    chunk per choice, a usage chunk when asked (empty choices), then [DONE]. With `running`
    (continuous usage stats), every chunk carries the usage so far."""

    def __init__(self, frames: CompletionFrames, running: RunningUsage | None = None):
        self.frames = frames
        self.meta = frames.meta
        self.started: set[int] = set()
        self.running = running

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        extra = {}
        if self.frames.call.include_usage:
            extra["usage"] = running_usage(usage, self.running)
        return sse(self.frames.envelope(choices, **extra))

    def start(self) -> str:
        return ""

    def prompt(self, event: PromptLogprobs) -> str:
        self.frames.prompt(event)
        return ""

    def text(self, delta: TextDelta) -> str:
        if self.running is not None:
            self.running.add(delta)
        frames = self._begin(delta.index)
        choice, block = self.frames.delta(delta)
        body = self.frames.choice_body(choice.index, delta.text, block, None)
        return frames + self.chunk([body])

    def finish(self, finished: Finished) -> str:
        reasons = finished.finish_reasons or [finished.finish_reason]
        out = "".join(self._begin(c.index) for c in self.frames.choices)
        for c in self.frames.choices:
            out += self.chunk(
                [self.frames.choice_body(c.index, "", None, _reason(reasons, c.index))]
            )
        if self.frames.call.include_usage:
            out += self.chunk([], usage=completion_usage(finished))
        return out + DONE

    def error(self, err: ApiError) -> str:
        return sse(error_body(err)) + DONE

    def _begin(self, index: int) -> str:
        """The echo chunk of a choice, before its first text (nothing without echo)."""
        if index in self.started:
            return ""
        self.started.add(index)
        text, block = self.frames.start_choice(self.frames.choices[index])
        if not text:
            return ""
        return self.chunk([self.frames.choice_body(index, text, block, None)])


class PromptBatch:
    """The generations of a request's prompts as one (Generation's interface: `aiter`,
    `close`, `prompt_tokens`, `choices`): their events interleaved as they come, each
    TextDelta's choice renumbered `prompt * n + index` and each PromptLogprobs marked with its
    prompt, then one Finished with every choice's finish reason and the usage summed (OpenAI's
    and vLLM's batch usage). A failure of one ends them all: the error is raised, the others
    closed."""

    def __init__(self, generations: list, n: int):
        self.generations = generations
        self.n = n
        self.prompt_tokens = sum(g.prompt_tokens for g in generations)
        self.choices = n * len(generations)
        self.session_id = generations[0].session_id

    async def aiter(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._pump(p, g, queue)) for p, g in enumerate(self.generations)
        ]
        finished: dict[int, Finished] = {}
        try:
            while len(finished) < len(self.generations):
                prompt, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Finished):
                    finished[prompt] = event
                elif isinstance(event, TextDelta):
                    yield replace(event, index=prompt * self.n + event.index)
                elif isinstance(event, PromptLogprobs):
                    yield replace(event, prompt=prompt)
                else:
                    yield event
            yield self._merge([finished[p] for p in range(len(self.generations))])
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    @staticmethod
    async def _pump(prompt: int, generation, queue: asyncio.Queue) -> None:
        try:
            async for event in generation.aiter():
                queue.put_nowait((prompt, event))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to aiter, which raises it
            queue.put_nowait((prompt, e))

    def _merge(self, finished: list[Finished]) -> Finished:
        reasons = [r for f in finished for r in (f.finish_reasons or [f.finish_reason] * self.n)]
        usage = Usage(
            prompt_tokens=sum(f.usage.prompt_tokens for f in finished),
            completion_tokens=sum(f.usage.completion_tokens for f in finished),
            reasoning_tokens=sum(f.usage.reasoning_tokens for f in finished),
            cached_tokens=sum(f.usage.cached_tokens for f in finished),
        )
        firsts = [f.first_token_at for f in finished if f.first_token_at is not None]
        return replace(
            finished[-1],
            finish_reason=reasons[-1],
            finish_reasons=reasons,
            usage=usage,
            first_token_at=min(firsts) if firsts else None,
        )

    def cancel(self) -> None:
        for generation in self.generations:
            generation.cancel()

    def close(self) -> None:
        for generation in self.generations:
            generation.close()


# -- tokenizer routes ------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeCall:
    """POST /tokenize in llama-server's shape (`content`) or vLLM's (`prompt` or `messages`)."""

    style: str  # llama | vllm
    text: str | None
    messages: list | None
    add_special: bool
    with_pieces: bool
    add_generation_prompt: bool = True  # messages: end with the assistant turn's opening
    thinking: Thinking | None = None  # messages: chat_template_kwargs.enable_thinking and kin
    model: str | None = None  # checked like every route's (404 for a model not served)


def parse_tokenize(body: dict[str, Any]) -> TokenizeCall:
    f = Fields(body)
    model = f.string("model")
    if "content" in body:
        call = TokenizeCall(
            "llama",
            f.string("content", required=True),
            None,
            bool(f.boolean("add_special")),
            bool(f.boolean("with_pieces")),
            model=model,
        )
        if f.boolean("parse_special") is False:  # true, llama-server's default, is fermi's way
            raise InvalidRequest(
                "parse_special: false is not supported (special tokens in the text are parsed)",
                param="parse_special",
            )
    elif "messages" in body:
        items = f.array("messages", required=True)
        messages = [_message(Fields(m, f"messages[{i}]"), CHAT_ROLES) for i, m in enumerate(items)]
        call = TokenizeCall(
            "vllm",
            None,
            messages,
            False,
            False,
            add_generation_prompt=f.boolean("add_generation_prompt") is not False,
            thinking=_thinking(f, None),
            model=model,
        )
    else:
        add = f.boolean("add_special_tokens")
        call = TokenizeCall(
            "vllm", f.string("prompt", required=True), None, add is not False, False, model=model
        )
    _check_tokenizer_fields(body, f.used)
    return call


def parse_detokenize(body: dict[str, Any]) -> tuple[str | None, list[int]]:
    """(model, tokens); raises InvalidRequest naming a bad or unknown field."""
    f = Fields(body)
    model = f.string("model")
    tokens = f.array("tokens", required=True)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequest("tokens must be an array of token ids", param="tokens")
    _check_tokenizer_fields(body, f.used)
    return model, tokens


def _check_tokenizer_fields(body: dict[str, Any], used: set[str]) -> None:
    unknown = first_unknown(body, used, ())
    if unknown is not None:
        raise InvalidRequest(f"{unknown}: {UNKNOWN}", param=unknown)


def tokenize_body(
    call: TokenizeCall, ids: list[int], text: TokenText, max_model_len: int
) -> dict[str, Any]:
    if call.style == "vllm":
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}
    if call.with_pieces:
        return {"tokens": [{"id": i, "piece": text.piece(i)[0]} for i in ids]}
    return {"tokens": ids}


def detokenize_body(content: str) -> dict[str, Any]:
    """Both peers' keys: llama-server reads `content`, vLLM `prompt`."""
    return {"content": content, "prompt": content}
