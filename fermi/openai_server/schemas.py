"""Request bodies -> validated calls. The JSON is parsed once here; every type or range problem
becomes an InvalidRequest naming its parameter, and what goes inward is the runtime's
GenerationRequest. Fields a route does not read are refused or ignored by the rules of
field_policy.py (which lists them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fermi.errors import InvalidRequest, ModelNotFound
from fermi.openai_server import tool_schemas
from fermi.openai_server.field_policy import UNSUPPORTED, check_fields, check_keys
from fermi.openai_server.hostile import MAX_DEPTH, check_body
from fermi.requests import GenerationRequest, Message, SamplingParams, Thinking
from fermi.sampling import MAX_LOGPROBS, validate_sampling
from fermi.security import validate_session_id
from fermi.tool_calls import ToolFields, check_tool_results, id_list

CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
RESPONSES_ROLES = {k: v for k, v in CHAT_ROLES.items() if k != "tool"}
TEXT_PART_TYPES = {"text", "input_text", "output_text"}
REASONING_PART_TYPES = {"reasoning_text", "summary_text"}
THINKING_WORDS = {
    "on": "on", "true": "on", "yes": "on", "1": "on",
    "off": "off", "false": "off", "no": "off", "0": "off",
    "auto": "auto",
}  # fmt: skip
# OpenAI's reasoning_effort values; Qwen3 has no budget, only on or off.
EFFORT_THINKING = {
    "none": "off",
    "minimal": "off",
    "low": "on",
    "medium": "on",
    "high": "on",
    "xhigh": "on",
}
MAX_CHOICES = 16
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Responses `include` values: the one that asks for logprobs, and one that asks for something
# fermi never produces (encrypted reasoning: reasoning comes back in plain text), accepted.
RESPONSES_INCLUDE = {LOGPROBS_INCLUDE, "reasoning.encrypted_content"}
# Keys that clients send back on replayed history and that change nothing here: a participant's
# `name` (openai-python, langchain-openai), an assistant message's `refusal` and `annotations`
# and openai-python's `parsed` copy of its content; Responses output items' `id` and `status`,
# and reasoning items' `summary` and `encrypted_content` (fermi sends reasoning in full).
# `cache_control`: Anthropic-style prompt-caching marks (litellm passes them on to servers other
# than OpenAI's); fermi caches every prefix by itself, so the mark asks for nothing more.
MESSAGE_ECHOES = frozenset({"name", "refusal", "annotations", "parsed", "cache_control"})
ITEM_ECHOES = frozenset({"id", "status"})
REASONING_ITEM_ECHOES = ITEM_ECHOES | {"summary", "encrypted_content"}
# On a replayed output_text part: `annotations`, `logprobs`; on any part: `cache_control`, and
# `id` (LangChain's standard content blocks carry one).
PART_ECHOES = frozenset({"annotations", "logprobs", "cache_control", "id"})
# A message key fermi has no use for, with the reason a non-null value is refused.
MESSAGE_REFUSALS = {
    "audio": "audio in messages is not supported",
    "function_call": "the deprecated functions API is not supported; send tool_calls instead",
}
REASONING_SUMMARIES = {"auto", "concise", "detailed"}  # moot: reasoning comes back in full


@dataclass(frozen=True)
class ChatCall:
    """A parsed POST /v1/chat/completions."""

    model: str | None
    stream: bool
    include_usage: bool
    generation: GenerationRequest
    logprobs: bool = False  # choices carry logprobs.content
    continuous_usage: bool = False  # every chunk carries the usage so far (vLLM)


@dataclass(frozen=True)
class ResponsesCall:
    """A parsed POST /v1/responses."""

    model: str | None
    stream: bool
    instructions: str | None
    max_output_tokens: int | None
    generation: GenerationRequest
    logprobs: bool = False  # output_text parts and deltas carry logprobs
    tools: list[dict[str, Any]] | None = None  # as sent (flat), echoed in the response
    text_format: dict[str, Any] | None = None  # text.format as sent
    # Echoed in the response object, as OpenAI's is (fermi stores nothing: store is only echoed)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    reasoning_summary: str | None = None


def parse_json(raw: bytes | None) -> dict[str, Any]:
    """The body as a JSON object. Raises InvalidRequest when it is empty, not UTF-8 (a UTF-8
    BOM is allowed; JSON over HTTP is UTF-8), not JSON, nests too deep or is not an object."""
    if not raw:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"the request body must be UTF-8 encoded JSON; byte {e.start} is not UTF-8"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_body(data)
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def check_model(requested: str | None, names: str | Sequence[str]) -> None:
    """Raise ModelNotFound unless `requested` is absent or one of the loaded model's names
    (ModelInfo.names: served names, id, full path, folder name; the first is reported). A
    single id also answers to its last path part (Qwen3-1.7B)."""
    if isinstance(names, str):
        names = [names, names.rsplit("/", 1)[-1]]
    if requested is None or requested in names:
        return
    raise ModelNotFound(f"The model {requested!r} does not exist; this server serves {names[0]!r}")


class Fields:
    """Typed reads of one JSON object. null counts as absent; a wrong type names the param."""

    def __init__(self, data: object, where: str = ""):
        if not isinstance(data, dict):
            raise InvalidRequest(f"{where or 'the body'} must be an object", param=where or None)
        self.data = data
        self.where = where
        self.used: set[str] = set()  # the fields read (see field_policy.check_fields)

    def raw(self, name: str) -> Any:
        """The untyped value (None when absent); the field counts as read."""
        self.used.add(name)
        return self.data.get(name)

    def param(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def _get(self, name: str, kinds: tuple[type, ...], what: str, required: bool) -> Any:
        value = self.raw(name)
        if value is None:
            if required:
                raise InvalidRequest(f"{self.param(name)} is required", param=self.param(name))
            return None
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise InvalidRequest(
                f"{self.param(name)} must be {what}, got {type(value).__name__}",
                param=self.param(name),
            )
        return value

    def string(self, name: str, required: bool = False, choices: set[str] | None = None) -> Any:
        value = self._get(name, (str,), "a string", required)
        if choices is not None and value is not None and value not in choices:
            raise InvalidRequest(
                f"{self.param(name)} must be one of {sorted(choices)}, got {value!r}",
                param=self.param(name),
            )
        return value

    def boolean(self, name: str) -> bool | None:
        return self._get(name, (bool,), "a boolean", False)

    def integer(self, name: str, minimum: int | None = None) -> int | None:
        value = self._get(name, (int,), "an integer", False)
        if value is not None and minimum is not None and value < minimum:
            raise InvalidRequest(
                f"{self.param(name)} must be at least {minimum}, got {value}",
                param=self.param(name),
            )
        return value

    def number(self, name: str) -> float | None:
        return self._get(name, (int, float), "a number", False)

    def object(self, name: str) -> Fields | None:
        value = self._get(name, (dict,), "an object", False)
        return None if value is None else Fields(value, self.param(name))

    def array(self, name: str, required: bool = False) -> list | None:
        return self._get(name, (list,), "an array", required)

    def check_unread(self, ignored=(), reasons: dict[str, str] | None = None) -> None:
        """Raise InvalidRequest naming the path of the first key not read (field_policy's
        check_keys) of this nested object."""
        check_keys(self.data, self.used, self.where, ignored, reasons)


# -- shared pieces -------------------------------------------------------------------------------


def _sampling(f: Fields) -> SamplingParams:
    top_k = f.integer("top_k")
    params = SamplingParams(
        temperature=f.number("temperature"),
        top_p=f.number("top_p"),
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
        min_p=f.number("min_p"),
        repetition_penalty=f.number("repetition_penalty"),
        presence_penalty=f.number("presence_penalty") or 0.0,
        frequency_penalty=f.number("frequency_penalty") or 0.0,
        seed=f.integer("seed"),  # -1: a random seed, as vLLM and llama.cpp read it
        logit_bias=_logit_bias(f),
    )
    validate_sampling(params)  # the runtime's ranges, one table for every transport
    return params


def _logit_bias(f: Fields) -> dict[int, float]:
    """OpenAI's logit_bias: an object of token id (as a JSON string key) -> bias."""
    bias = f.object("logit_bias")
    if bias is None:
        return {}
    out = {}
    for key, value in bias.data.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            )
        out[int(key)] = value  # the range is checked with the sampling values
    return out


def _choices(f: Fields) -> int:
    n = f.integer("n", minimum=1) or 1
    if n > MAX_CHOICES:
        raise InvalidRequest(f"n must be at most {MAX_CHOICES}, got {n}", param="n")
    return n


def _top_logprobs(f: Fields) -> int | None:
    k = f.integer("top_logprobs", minimum=0)
    if k is not None and k > MAX_LOGPROBS:
        raise InvalidRequest(
            f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {k}", param="top_logprobs"
        )
    return k


def _only(f: Fields, name: str, allowed: tuple) -> None:
    """A known OpenAI field fermi honours only at these values (its default)."""
    value = f.raw(name)
    if value is not None and value not in allowed:
        raise InvalidRequest(f"{name}: {UNSUPPORTED[name]}, got {value!r}", param=name)


def _common_options(f: Fields) -> None:
    """Known fields every route takes at their default value only."""
    _only(f, "service_tier", ("auto", "default"))
    _only(f, "modalities", (["text"],))


def _stream_options(f: Fields, usage: bool) -> tuple[bool, bool]:
    """`stream_options` -> (include_usage, continuous_usage_stats). `usage`: the route streams
    usage (chat, completions); Responses takes only include_obfuscation, which is moot (fermi
    never pads its events). Raises InvalidRequest for the options without `stream: true` (they
    would do nothing: OpenAI and vLLM refuse them too), continuous_usage_stats without
    include_usage (vLLM ignores it then) and any other key."""
    options = f.object("stream_options")
    if options is None:
        return False, False
    if not f.boolean("stream"):
        raise InvalidRequest(
            "stream_options is only allowed with stream: true", param="stream_options"
        )
    options.boolean("include_obfuscation")
    include, continuous = False, False
    if usage:
        include = bool(options.boolean("include_usage"))
        continuous = bool(options.boolean("continuous_usage_stats"))
        if continuous and not include:
            param = options.param("continuous_usage_stats")
            raise InvalidRequest(f"{param} needs include_usage: true", param=param)
    options.check_unread()
    return include, continuous


def _stop(f: Fields) -> list[str]:
    value = f.raw("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest("stop must be a non-empty string or an array of them", param="stop")
    return stops


def _thinking(f: Fields, effort: str | None) -> Thinking | None:
    """`thinking` wins over vLLM's chat_template_kwargs.enable_thinking, which wins over a
    top-level enable_thinking, which wins over OpenAI's reasoning effort; none of them means
    the server's default. All are read (and type-checked) whichever wins."""
    raw = f.raw("thinking")
    kwargs = f.object("chat_template_kwargs")
    nested = kwargs.boolean("enable_thinking") if kwargs else None
    if kwargs:
        kwargs.check_unread()  # no other template variable reaches the template
    top = f.boolean("enable_thinking")  # top-level, as some clients send it
    if raw is not None:
        word = str(raw).lower() if isinstance(raw, bool | str) else None
        if word not in THINKING_WORDS:
            raise InvalidRequest(
                f"thinking must be on, off, auto, true or false, got {raw!r}", param="thinking"
            )
        return THINKING_WORDS[word]
    enable = nested if nested is not None else top
    if enable is not None:
        return "on" if enable else "off"
    return EFFORT_THINKING[effort] if effort is not None else None


def _session_id(f: Fields) -> str | None:
    value = f.string("session_id") or None
    validate_session_id(value)
    return value


def _content(f: Fields, name: str, required: bool, part_types: set[str] = TEXT_PART_TYPES) -> str:
    """A string, or an array of text parts (joined); other part types are refused."""
    value = f.raw(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{f.param(name)} is required", param=f.param(name))
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(
            f"{f.param(name)} must be a string or an array of text parts", param=f.param(name)
        )
    texts = []
    for j, raw in enumerate(value):
        part = Fields(raw, f"{f.param(name)}[{j}]")
        kind = part.string("type") or "text"
        if kind not in part_types:
            raise InvalidRequest(
                f"{part.param('type')}: only text content is supported, got {kind!r}",
                param=part.param("type"),
            )
        texts.append(part.string("text", required=True))
        part.check_unread(PART_ECHOES)
    return "".join(texts)


def _message(f: Fields, roles: dict[str, str], ignored: frozenset[str] = MESSAGE_ECHOES) -> Message:
    """One message; `ignored`: the keys accepted unread. Raises InvalidRequest naming the
    field, a key not read nor ignored included (messages[i].extra)."""
    role = f.string("role", required=True)
    if role not in roles:
        raise InvalidRequest(
            f"{f.param('role')}: unknown role {role!r}; expected one of {', '.join(roles)}",
            param=f.param("role"),
        )
    content = _content(f, "content", required=role not in ("assistant", "tool"))
    # fermi's own replies carry the reasoning under both names (formatters.reasoning_fields)
    reasoning = f.string("reasoning_content")
    alias = f.string("reasoning")
    message = Message(roles[role], content, reasoning_content=reasoning or alias)
    if role == "assistant":
        message.tool_calls = tool_schemas.assistant_tool_calls(f)
    if role == "tool":
        message.tool_call_id = f.string("tool_call_id")
    f.check_unread(ignored, MESSAGE_REFUSALS)
    return message


# -- endpoints -----------------------------------------------------------------------------------


def _chat_messages(f: Fields) -> list[Message]:
    """`messages`; tool messages answer the calls of the assistant message before them, each
    call once and every call before the next message of another role (tool_calls.
    check_tool_results: InvalidRequest on messages[i].role, messages[i].tool_call_id or, for
    calls left unanswered, messages[i].tool_calls)."""
    items = f.array("messages", required=True)
    if not items:
        raise InvalidRequest("messages must not be empty", param="messages")
    messages = [_message(Fields(m, f"messages[{i}]"), CHAT_ROLES) for i, m in enumerate(items)]

    def unanswered(i: int, ks: list[int]) -> InvalidRequest:
        param = f"messages[{i}].tool_calls"
        ids = id_list([messages[i].tool_calls[k]["id"] for k in ks])
        return InvalidRequest(
            f"{param}: an assistant message with tool_calls must be followed by tool messages "
            "answering each tool_call_id (before any message of another role); these "
            f"tool_call_ids have none: {ids}",
            param=param,
        )

    check_tool_results(messages, ToolFields(lambda i: f"messages[{i}]", unanswered, ".role"))
    return messages


def parse_chat(body: dict[str, Any]) -> ChatCall:
    f = Fields(body)
    messages = _chat_messages(f)
    legacy_max = f.integer("max_tokens", minimum=1)
    max_tokens = f.integer("max_completion_tokens", minimum=1) or legacy_max
    include_usage, continuous_usage = _stream_options(f, usage=True)
    effort = f.string("reasoning_effort", choices=set(EFFORT_THINKING))
    logprobs = bool(f.boolean("logprobs"))
    top_logprobs = _top_logprobs(f)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    _common_options(f)
    tools = tool_schemas.chat_tools(f)
    call = ChatCall(
        model=f.string("model"),
        stream=bool(f.boolean("stream")),
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        logprobs=logprobs,
        generation=GenerationRequest(
            messages=messages,
            max_new_tokens=max_tokens,
            sampling=_sampling(f),
            stop=_stop(f),
            thinking=_thinking(f, effort),
            session_id=_session_id(f),
            append=False,  # OpenAI clients resend the whole conversation
            ignore_eos=bool(f.boolean("ignore_eos")),
            n=_choices(f),
            logprobs=(top_logprobs or 0) if logprobs else None,
            tools=tools,
            tool_choice=tool_schemas.tool_choice(f, tools, flat=False),
            parallel_tool_calls=f.boolean("parallel_tool_calls") is not False,
            output_format=tool_schemas.response_format(f),
        ),
    )
    check_fields(body, f.used, "chat")
    return call


def parse_responses(body: dict[str, Any]) -> ResponsesCall:
    f = Fields(body)
    if f.raw("previous_response_id") is not None:
        raise InvalidRequest(
            "previous_response_id is not supported (responses are not stored); resend the "
            "conversation in input, with a session_id to reuse its KV cache",
            param="previous_response_id",
        )
    messages = _responses_input(f)
    instructions = f.string("instructions")
    if instructions:
        messages.insert(0, Message("system", instructions))
    effort, summary = _reasoning(f)
    max_output_tokens = f.integer("max_output_tokens", minimum=1)
    top_logprobs = _top_logprobs(f)
    logprobs = _responses_include(f) or top_logprobs is not None
    _common_options(f)
    _stream_options(f, usage=False)
    _only(f, "background", (False,))
    _only(f, "truncation", ("disabled",))
    tools = tool_schemas.responses_tools(f)
    text = f.object("text")
    output_format = tool_schemas.text_format(text)
    if text is not None:
        text.check_unread(reasons={"verbosity": UNSUPPORTED["verbosity"]})
    call = ResponsesCall(
        model=f.string("model"),
        stream=bool(f.boolean("stream")),
        instructions=instructions,
        max_output_tokens=max_output_tokens,
        logprobs=logprobs,
        tools=f.raw("tools") or [],
        text_format=text.data.get("format") if output_format else None,
        metadata=f.raw("metadata"),  # type-checked with the informational fields
        store=f.raw("store"),
        reasoning_effort=effort,
        reasoning_summary=summary,
        generation=GenerationRequest(
            messages=messages,
            max_new_tokens=max_output_tokens,
            sampling=_sampling(f),
            stop=_stop(f),
            thinking=_thinking(f, effort),
            session_id=_session_id(f),
            append=False,
            ignore_eos=bool(f.boolean("ignore_eos")),
            logprobs=(top_logprobs or 0) if logprobs else None,
            tools=tools,
            tool_choice=tool_schemas.tool_choice(f, tools, flat=True),
            parallel_tool_calls=f.boolean("parallel_tool_calls") is not False,
            output_format=output_format,
        ),
    )
    check_fields(body, f.used, "responses")
    return call


def _reasoning(f: Fields) -> tuple[str | None, str | None]:
    """`reasoning`: (effort, summary). A summary is accepted and echoed but changes nothing:
    the reasoning comes back in full. Raises InvalidRequest naming reasoning.* otherwise."""
    reasoning = f.object("reasoning")
    if reasoning is None:
        return None, None
    effort = reasoning.string("effort", choices=set(EFFORT_THINKING))
    summary = reasoning.string("summary", choices=REASONING_SUMMARIES)
    reasoning.check_unread()
    return effort, summary


def _responses_include(f: Fields) -> bool:
    """Whether `include` asks for output logprobs; values fermi cannot provide are refused."""
    include = f.array("include") or []
    for i, value in enumerate(include):
        if value not in RESPONSES_INCLUDE:
            raise InvalidRequest(
                f"include[{i}]: {value!r} is not supported; supported: "
                f"{', '.join(sorted(RESPONSES_INCLUDE))}",
                param=f"include[{i}]",
            )
    return LOGPROBS_INCLUDE in include


def _responses_input(f: Fields) -> list[Message]:
    """`input` is a string (one user turn) or an array of items: messages, reasoning (attached
    to the assistant message that follows it), function_call (a tool call of the assistant turn;
    an assistant message or reasoning item among a turn's calls, as a response's own output
    holds them, stays in that turn) and function_call_output (a tool message, which must answer
    a function_call before it, each call once and every call before the next message:
    tool_calls.check_tool_results, InvalidRequest on input[i] or input[i].call_id, or on the
    input[i] of a function_call left unanswered)."""
    value = f.raw("input")
    if isinstance(value, str):
        return [Message("user", value)]
    items = f.array("input", required=True)
    if not items:
        raise InvalidRequest("input must not be empty", param="input")
    messages: list[Message] = []
    item_of: list[int] = []  # the input item of each message
    call_items: dict[int, list[int]] = {}  # the function_call items of an assistant message
    reasoning: str | None = None
    for i, raw in enumerate(items):
        item = Fields(raw, f"input[{i}]")
        kind = item.string("type") or "message"
        if kind == "reasoning":
            reasoning = _content(item, "content", False, REASONING_PART_TYPES) or None
            item.check_unread(REASONING_ITEM_ECHOES)
            continue
        if kind == "function_call":
            if _add_function_call(messages, item, reasoning):
                item_of.append(i)
            call_items.setdefault(len(messages) - 1, []).append(i)
            item.check_unread(ITEM_ECHOES)
            reasoning = None
            continue
        if kind == "function_call_output":
            call_id = item.string("call_id", required=True)
            output = _content(item, "output", required=True)
            item.check_unread(ITEM_ECHOES)
            messages.append(Message("tool", output, tool_call_id=call_id))
            item_of.append(i)
            continue
        if kind != "message":
            raise InvalidRequest(
                f"input[{i}].type {kind!r} is not supported; only message, reasoning, "
                "function_call and function_call_output items",
                param=item.param("type"),
            )
        message = _message(item, RESPONSES_ROLES, ITEM_ECHOES)
        if message.role == "assistant" and reasoning and not message.reasoning_content:
            message.reasoning_content = reasoning
        reasoning = None
        if _calling_turn(messages) and message.role == "assistant" and not message.tool_calls:
            # text the model wrote after its calls, replayed in output order: the same turn
            turn = messages[-1]
            turn.content = _joined(turn.content, message.content)
            turn.reasoning_content = _joined(turn.reasoning_content, message.reasoning_content)
            continue
        messages.append(message)
        item_of.append(i)
    if not messages:
        raise InvalidRequest("input holds no message", param="input")

    def unanswered(m: int, ks: list[int]) -> InvalidRequest:
        # the turn's last calls come from function_call items; any before them, from the
        # message item's own tool_calls
        items = call_items.get(m, [])
        k = ks[0] - (len(messages[m].tool_calls) - len(items))
        param = f"input[{items[k]}]" if k >= 0 else f"input[{item_of[m]}].tool_calls"
        ids = id_list([messages[m].tool_calls[k]["id"] for k in ks])
        return InvalidRequest(
            f"{param}: no function_call_output found for function call{'s' * (len(ks) > 1)} "
            f"{ids} (each function_call needs one with its call_id, before the next message)",
            param=param,
        )

    check_tool_results(
        messages,
        ToolFields(
            lambda m: f"input[{item_of[m]}]",
            unanswered,
            "",
            ".call_id",
            result="a function_call_output",
            results="function_call_output items",
            turn="the function_call items it answers",
            before="among the function_call items before it",
        ),
    )
    return messages


def _calling_turn(messages: list[Message]) -> bool:
    """Whether the last message is an assistant turn with tool calls (none answered yet)."""
    return bool(messages) and messages[-1].role == "assistant" and bool(messages[-1].tool_calls)


def _joined(first: str | None, second: str | None) -> str | None:
    return "\n\n".join(t for t in (first, second) if t) or first


def _add_function_call(messages: list[Message], item: Fields, reasoning: str | None) -> bool:
    """A function_call item joins the assistant turn just before it, or starts one (True). A
    reasoning item before it starts a new turn, unless the turn before is already making calls
    (a response's output holds a reasoning item before each of its calls): then the reasoning
    joins that turn's."""
    call = {
        "id": item.string("call_id", required=True),
        "type": "function",
        "function": {
            "name": item.string("name", required=True),
            "arguments": item.string("arguments", required=True),
        },
    }
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant" and (not reasoning or last.tool_calls):
        last.tool_calls = (last.tool_calls or []) + [call]
        last.reasoning_content = _joined(last.reasoning_content, reasoning)
        return False
    messages.append(Message("assistant", "", reasoning_content=reasoning, tool_calls=[call]))
    return True
