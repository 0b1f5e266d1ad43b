"""Every response body, SSE chunk and event the OpenAI server sends is built here, from the
runtime's events (TextDelta, Finished) and the parsed call. Nothing here does I/O."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fermi.openai_server.errors import ApiError
from fermi.openai_server.logprobs import token_entries
from fermi.openai_server.schemas import ResponsesCall
from fermi.requests import Finished, GenerationRequest, TextDelta, ToolCallDelta, Usage
from fermi.sampling import SampledToken
from fermi.token_text import TokenText

FINGERPRINT = "fermi"
DONE = "data: [DONE]\n\n"


# Line separators that JSON leaves raw but that line splitters honour (Python's
# str.splitlines, hence httpx's iter_lines; JavaScript before ES2019): escaped, so an SSE
# `data:` line is one line for every client. They can only occur inside JSON strings.
LINE_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII text as is, line separators escaped."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(LINE_SEPARATORS)


def sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dumps(data)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def error_body(err: ApiError) -> dict[str, Any]:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


@dataclass(frozen=True)
class Meta:
    """What every body of one request repeats."""

    id: str
    model: str
    session_id: str | None  # echoed when the request named a session
    created: int = field(default_factory=lambda: int(time.time()))


def _session(meta: Meta) -> dict[str, str]:
    return {"session_id": meta.session_id} if meta.session_id else {}


# -- models --------------------------------------------------------------------------------------


def model_card(info, created: int) -> dict[str, Any]:
    """OpenAI's model object (id, object, created, owned_by) and what a client can use beside
    it: `context_length` (also as vLLM's `max_model_len`), in tokens; thinking and tool
    support; precision and graph target. `info` is a fermi.model_info.ModelInfo."""
    return {
        "id": info.id,
        "object": "model",
        "created": created,
        "owned_by": "fermi",
        "context_length": info.context_length,
        "max_model_len": info.context_length,
        "supports_thinking": info.supports_thinking,
        "supports_tools": info.supports_tools,
        "architecture": info.architecture,
        "precision": info.precision,
        "target": info.target,
    }


def model_list(card: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": [card]}


# -- chat completions ----------------------------------------------------------------------------


def chat_finish_reason(finished: Finished) -> str:
    return finished.finish_reason  # stop | length; cancelled only reaches a client that is gone


def chat_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


@dataclass
class RunningUsage:
    """vLLM's stream_options.continuous_usage_stats: the usage so far, on every chunk.
    completion_tokens counts the tokens of the pieces sent so far (a token whose text is held
    back, as a possible stop string, counts with the piece that releases it); the last chunk
    carries the generation's exact usage."""

    prompt_tokens: int
    completion_tokens: int = 0

    def add(self, delta: TextDelta | ToolCallDelta) -> None:
        self.completion_tokens += len(delta.token_ids)

    def body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def reasoning_fields(text: str) -> dict[str, str]:
    """Reasoning under both names clients read: `reasoning_content` (llama-server, DeepSeek,
    older vLLM, LiteLLM) and `reasoning` (current vLLM, Ollama, OpenRouter)."""
    return {"reasoning_content": text, "reasoning": text}


@dataclass
class ChoiceText:
    """One choice's collected output; `tokens`: the answer's tokens with logprobs;
    `tool_calls`: its calls in OpenAI's shape."""

    index: int
    reasoning: str = ""
    answer: str = ""
    tokens: list[SampledToken] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add_tool_call(self, event: ToolCallDelta) -> None:
        if event.id is not None:
            self.tool_calls.append(
                {
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            )
        self.tool_calls[event.index]["function"]["arguments"] += event.arguments


def choice_finish_reason(finished: Finished, index: int) -> str:
    reasons = finished.finish_reasons or [finished.finish_reason]
    return reasons[index] if index < len(reasons) else "stop"


def may_call_tools(request: GenerationRequest) -> bool:
    """Whether the reply may carry tool calls (tools offered, tool_choice not "none"). Then a
    chat message with no text has `content: null`, as OpenAI's content beside tool calls is,
    whether calls came or a forced call was cut off before its name (stream: from the role
    chunk on, which cannot know yet)."""
    return bool(request.tools) and request.tool_choice != "none"


def chat_completion(
    meta: Meta,
    choices: list[ChoiceText],
    finished: Finished,
    text: TokenText | None = None,
    may_call: bool = False,
) -> dict[str, Any]:
    """`text` given: the choices carry `logprobs.content` (the answer's tokens). `may_call`:
    see may_call_tools."""
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "index": choice.index,
                "message": _message(choice, may_call),
                "logprobs": _chat_logprobs(text, choice.tokens),
                "finish_reason": choice_finish_reason(finished, choice.index),
            }
            for choice in choices
        ],
        "usage": chat_usage(finished.usage),
        **_session(meta),
    }


def _message(choice: ChoiceText, may_call: bool) -> dict[str, Any]:
    content = choice.answer if choice.answer or not (may_call or choice.tool_calls) else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if choice.reasoning:
        message.update(reasoning_fields(choice.reasoning))
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    return message


def _chat_logprobs(text: TokenText | None, tokens: list[SampledToken]) -> dict[str, Any] | None:
    if text is None:
        return None
    return {"content": token_entries(text, tokens), "refusal": None}


class ChatStream:
    """The frames of one chat.completion.chunk stream: a role chunk per choice, text deltas
    (each naming its choice `index`), a finish chunk per choice, an optional usage chunk
    (empty choices), then [DONE]. With `text` (logprobs asked), answer chunks carry
    `logprobs.content` for their tokens. The role chunk's content is "" (more text follows),
    or null when `may_call` (may_call_tools): no chunk carries content but text. With
    `running` (continuous usage stats), every chunk carries the usage so far instead of null."""

    def __init__(
        self,
        meta: Meta,
        include_usage: bool,
        n: int = 1,
        text: TokenText | None = None,
        may_call: bool = False,
        running: RunningUsage | None = None,
    ):
        self.meta = meta
        self.include_usage = include_usage
        self.n = n
        self.token_text = text
        self.may_call = may_call
        self.running = running

    def chunk(
        self,
        delta: dict[str, Any] | None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """The one chunk builder; delta None makes the usage chunk (choices empty)."""
        choices = [] if delta is None else [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ]  # fmt: skip
        body = {
            "id": self.meta.id,
            "object": "chat.completion.chunk",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            **extra,
        }
        if self.include_usage:
            body["usage"] = running_usage(usage, self.running)
        return sse(body)

    def start(self) -> str:
        role = {"role": "assistant", "content": None if self.may_call else ""}
        return "".join(self.chunk(role, index=i) for i in range(self.n))

    def text(self, delta: TextDelta | ToolCallDelta) -> str:
        if self.running is not None:
            self.running.add(delta)
        if isinstance(delta, ToolCallDelta):
            return self.chunk({"tool_calls": [tool_call_delta(delta)]}, index=delta.choice)
        if delta.kind == "reasoning":
            return self.chunk(reasoning_fields(delta.text), index=delta.index)
        logprobs = None
        if self.token_text is not None:
            logprobs = _chat_logprobs(self.token_text, delta.logprobs)
        return self.chunk({"content": delta.text}, index=delta.index, logprobs=logprobs)

    def finish(self, finished: Finished) -> str:
        frames = [
            self.chunk({}, choice_finish_reason(finished, i), index=i, **_session(self.meta))
            for i in range(self.n)
        ]
        if self.include_usage:
            frames.append(self.chunk(None, usage=chat_usage(finished.usage)))
        return "".join(frames) + DONE

    def error(self, err: ApiError) -> str:
        return sse(error_body(err)) + DONE


def running_usage(
    usage: dict[str, Any] | None, running: RunningUsage | None
) -> dict[str, Any] | None:
    """A streamed chunk's `usage` when include_usage is on: the final usage on the last chunk;
    on the others null, as OpenAI sends it, or the usage so far with continuous usage stats."""
    if usage is not None or running is None:
        return usage
    return running.body()


def tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed tool call: index, id, type and name first, then arguments pieces."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {
        "index": delta.index,
        "id": delta.id,
        "type": "function",
        "function": {"name": delta.name, "arguments": delta.arguments},
    }


# -- responses -----------------------------------------------------------------------------------


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


def output_text_part(text: str, logprobs: list | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def reasoning_text_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def output_item(
    kind: str, item_id: str, text: str | None, status: str, logprobs: list | None = None
) -> dict[str, Any]:
    """A reasoning or message output item; text None means no content part yet."""
    if kind == "reasoning":
        content = [] if text is None else [reasoning_text_part(text)]
        return {"id": item_id, "type": "reasoning", "summary": [], "content": content,
                "status": status}  # fmt: skip
    content = [] if text is None else [output_text_part(text, logprobs)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}  # fmt: skip


def responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def response_status(finished: Finished) -> tuple[str, dict[str, str] | None]:
    if finished.finish_reason in ("stop", "tool_calls"):
        return "completed", None
    if finished.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "incomplete", None


def response_object(
    meta: Meta,
    call: ResponsesCall,
    status: str,
    output: list[dict[str, Any]],
    finished: Finished | None = None,
    error: ApiError | None = None,
) -> dict[str, Any]:
    sampling = call.generation.sampling
    incomplete = response_status(finished)[1] if finished else None
    return {
        "id": meta.id,
        "object": "response",
        "created_at": meta.created,
        "status": status,
        "model": meta.model,
        "output": output,
        "instructions": call.instructions,
        "max_output_tokens": call.max_output_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "parallel_tool_calls": call.generation.parallel_tool_calls,
        "tool_choice": _tool_choice_echo(call.generation.tool_choice),
        "tools": call.tools or [],
        "text": {"format": call.text_format or {"type": "text"}},
        "truncation": "disabled",
        "store": bool(call.store),  # echoed; nothing is stored
        "background": False,
        "metadata": call.metadata or {},
        "reasoning": {"effort": call.reasoning_effort, "summary": call.reasoning_summary},
        "incomplete_details": incomplete,
        "error": {"code": err_code(error), "message": error.message} if error else None,
        "usage": responses_usage(finished.usage) if finished else None,
        **_session(meta),
    }


def _tool_choice_echo(choice: str) -> str | dict[str, str]:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "name": choice}


def err_code(err: ApiError) -> str:
    return err.code or ("server_error" if err.status >= 500 else "invalid_request")


def response_final(
    meta: Meta,
    call: ResponsesCall,
    choice: ChoiceText,
    finished: Finished,
    text: TokenText | None = None,
) -> dict[str, Any]:
    """The non-streaming /v1/responses body: reasoning, message and function_call items;
    `text` given: output_text carries logprobs."""
    status, _ = response_status(finished)
    output = []
    if choice.reasoning:
        output.append(output_item("reasoning", new_id("rs_"), choice.reasoning, "completed"))
    if choice.answer or not choice.tool_calls:
        logprobs = token_entries(text, choice.tokens) if text is not None else None
        output.append(output_item("message", new_id("msg_"), choice.answer, status, logprobs))
    for tool_call in choice.tool_calls:
        function = tool_call["function"]
        output.append(
            function_call_item(
                new_id("fc_"), tool_call["id"], function["name"], function["arguments"], status
            )
        )
    return response_object(meta, call, status, output, finished)


@dataclass
class _OpenItem:
    kind: str  # reasoning | message | function_call
    id: str
    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class ResponseStream:
    """The `event:`-named frames of one /v1/responses stream, numbered by sequence_number:
    created, in_progress, per output item (reasoning, then message): output_item.added,
    content_part.added, *_text.delta..., *_text.done, content_part.done, output_item.done;
    per function call: output_item.added, function_call_arguments.delta...,
    function_call_arguments.done, output_item.done; then completed or incomplete (or error +
    failed)."""

    def __init__(self, meta: Meta, call: ResponsesCall, text: TokenText | None = None):
        self.meta = meta
        self.call = call
        self.token_text = text  # given: output_text deltas and parts carry logprobs
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # finished items
        self.item: _OpenItem | None = None
        self.has_message = False
        self.has_calls = False

    def event(self, kind: str, **fields: Any) -> str:
        """The one event builder."""
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(body, event=kind)

    def start(self) -> str:
        response = response_object(self.meta, self.call, "in_progress", [])
        return self.event("response.created", response=response) + self.event(
            "response.in_progress", response=response
        )

    def text(self, delta: TextDelta | ToolCallDelta) -> str:
        if isinstance(delta, ToolCallDelta):
            return self._tool_call(delta)
        kind = "reasoning" if delta.kind == "reasoning" else "message"
        frames = ""
        if self.item is None or self.item.kind != kind:
            frames = self._close("completed") + self._open(kind)
        item = self.item
        item.texts.append(delta.text)
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if kind == "reasoning":
            return frames + self.event("response.reasoning_text.delta", **where, delta=delta.text)
        logprobs = (
            token_entries(self.token_text, delta.logprobs) if self.token_text is not None else []
        )
        item.logprobs.extend(logprobs)
        return frames + self.event(
            "response.output_text.delta", **where, delta=delta.text, logprobs=logprobs
        )

    def finish(self, finished: Finished) -> str:
        status, _ = response_status(finished)
        frames = ""
        if not (self.has_message or self.has_calls):
            frames = self._close("completed") + self._open("message")
        frames += self._close(status)
        response = response_object(self.meta, self.call, status, self.output, finished)
        return frames + self.event(f"response.{status}", response=response)

    def error(self, err: ApiError) -> str:
        response = response_object(self.meta, self.call, "failed", self.output, error=err)
        return self.event(
            "error", code=err_code(err), message=err.message, param=err.param
        ) + self.event("response.failed", response=response)

    def _open(self, kind: str) -> str:
        prefix = "rs_" if kind == "reasoning" else "msg_"
        self.item = item = _OpenItem(kind, new_id(prefix), len(self.output))
        self.has_message |= kind == "message"
        part = reasoning_text_part("") if kind == "reasoning" else output_text_part("")
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        return self.event(
            "response.output_item.added",
            output_index=item.index,
            item=output_item(kind, item.id, None, "in_progress"),
        ) + self.event("response.content_part.added", **where, part=part)

    def _tool_call(self, delta: ToolCallDelta) -> str:
        frames = ""
        if delta.id is not None:
            frames = self._close("completed")
            self.item = item = _OpenItem("function_call", new_id("fc_"), len(self.output))
            item.call_id, item.name = delta.id, delta.name or ""
            self.has_calls = True
            added = function_call_item(item.id, item.call_id, item.name, "", "in_progress")
            frames += self.event("response.output_item.added", output_index=item.index, item=added)
        item = self.item
        if not delta.arguments:
            return frames
        item.texts.append(delta.arguments)
        return frames + self.event(
            "response.function_call_arguments.delta",
            item_id=item.id,
            output_index=item.index,
            delta=delta.arguments,
        )

    def _close(self, status: str) -> str:
        item, self.item = self.item, None
        if item is None:
            return ""
        text = "".join(item.texts)
        if item.kind == "function_call":
            done = function_call_item(item.id, item.call_id, item.name, text, status)
            self.output.append(done)
            return self.event(
                "response.function_call_arguments.done",
                item_id=item.id,
                output_index=item.index,
                name=item.name,
                arguments=text,
            ) + self.event("response.output_item.done", output_index=item.index, item=done)
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if item.kind == "reasoning":
            frames = self.event("response.reasoning_text.done", **where, text=text)
            part = reasoning_text_part(text)
        else:
            frames = self.event(
                "response.output_text.done", **where, text=text, logprobs=item.logprobs
            )
            part = output_text_part(text, item.logprobs)
        done = output_item(item.kind, item.id, text, status, item.logprobs)
        self.output.append(done)
        return (
            frames
            + self.event("response.content_part.done", **where, part=part)
            + self.event("response.output_item.done", output_index=item.index, item=done)
        )
