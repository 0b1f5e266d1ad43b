"""The runtime's typed request and event objects. Transports parse their wire format into these
at the edge and format the events back; nothing inside the runtime knows about HTTP or gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fermi.sampling import SampledToken

Thinking = Literal["on", "off", "auto"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "timeout"]
# "timeout": the runtime ended it at settings.timeout_ms; transports report it as an error.
TextKind = Literal["reasoning", "answer"]
ToolChoice = Literal["auto", "none", "required"] | str  # a str other than those: a function name


@dataclass
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    reasoning_content: str | None = None
    # OpenAI's shapes: [{"id", "type": "function", "function": {"name", "arguments"}}, ...]
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class OutputFormat:
    """A constraint on the answer text (OpenAI's response_format, fermi's grammar extension).

    kind: "json_object" (any JSON object), "json_schema" (`value` is the schema dict), "regex" or
    "lark" (`value` is the grammar text). `param` names the request field that holds the
    schema or grammar (errors blame it), e.g. "response_format.json_schema.schema".
    """

    kind: Literal["json_object", "json_schema", "regex", "lark"]
    value: dict | str | None = None
    param: str = "response_format"


@dataclass
class SamplingParams:
    """None means "use the model's generation_config.json default" (or Qwen's advice)."""

    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 = off
    min_p: float | None = None
    repetition_penalty: float | None = None  # 1.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # -1 or None: a random seed
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> [-100, 100]


@dataclass
class GenerationRequest:
    """`messages` go through the chat template; a raw `prompt` (text, or token ids) does not
    (the completions path: no template, no reasoning split). Exactly one of them is given."""

    messages: list[Message]
    # None: the rest of the context, or the server's cap (Runtime.default_max_new_tokens)
    max_new_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    thinking: Thinking | None = None  # None = the configured default
    # With a session_id, the session's cached KV is reused for the longest common token prefix.
    session_id: str | None = None
    # With no session_id: keep the session under a server-minted id (gRPC) instead of dropping
    # it when the request ends (OpenAI); it stays "unclaimed" until the id comes back.
    keep_session: bool = False
    # The caller's tenant (its API key, fermi/security.py): session ids live in its namespace.
    tenant: str = ""
    # append=True: `messages` are new turns added to the session's stored history (gRPC, CLI);
    # tool results among them answer the calls of the session's last turn, each once and all
    # of them, or the runtime refuses them (InvalidRequest on tool_results[j], j counting the
    # tool messages, or on tool_results).
    # append=False: `messages` are the whole conversation (OpenAI clients resend it every time).
    append: bool = False
    ignore_eos: bool = False  # benchmarks decode a fixed count
    prompt: str | list[int] | None = None  # raw prompt: text (special tokens added) or ids
    n: int = 1  # choices, generated one after another with seeds seed, seed + 1, ...
    logprobs: int | None = None  # None: none; k: each token's logprob and its k best rivals
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    # OpenAI function tools: [{"type": "function", "function": {"name", "description",
    # "parameters"}}]. They are rendered into the prompt by the model's chat template.
    tools: list[dict] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"  # "required" and a named function are enforced by a grammar
    parallel_tool_calls: bool = True
    output_format: OutputFormat | None = None


@dataclass
class TextDelta:
    """A piece of final text (never a broken character, never part of a stop string)."""

    text: str
    kind: TextKind
    token_ids: list[int]
    logprobs: list[SampledToken] = field(default_factory=list)  # per token, when asked
    index: int = 0  # the choice (n > 1)


@dataclass
class PromptLogprobs:
    """Sent before any text when a request asks for prompt_logprobs: one entry per prompt
    token, None for the first (nothing predicts it), from the model's raw distribution."""

    token_ids: list[int]
    logprobs: list[SampledToken | None]
    prompt: int = 0  # which prompt, in a request of several (/v1/completions)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int  # prompt tokens served from the session's KV cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Finished:
    """The last event of every generation."""

    finish_reason: FinishReason
    usage: Usage
    session_id: str
    thinking: bool  # whether the prompt enabled thinking
    dropped_turns: int = 0  # oldest turns dropped to fit the context
    # One per choice (n > 1): why each ended; finish_reason is the last one's. Usage counts the
    # prompt once and the completion tokens of every choice.
    finish_reasons: list[FinishReason] = field(default_factory=list)
    # time.perf_counter() when the first token was generated (None: none was), whether or not
    # it decoded to text yet: what time to first token is measured to
    first_token_at: float | None = None


@dataclass
class ToolCallDelta:
    """A piece of one tool call: the first piece of call `index` carries its id and name, the
    rest carry fragments of its JSON arguments (joined, they are the arguments string)."""

    index: int
    id: str | None
    name: str | None
    arguments: str
    token_ids: list[int]
    choice: int = 0  # the choice (n > 1) whose call this is


Event = TextDelta | ToolCallDelta | PromptLogprobs | Finished
