"""The runtime's typed request and event objects. Transports parse their wire format into these
at the edge and format the events back; nothing inside the runtime knows about HTTP or gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Thinking = Literal["on", "off", "auto"]
FinishReason = Literal["stop", "length", "cancelled"]
TextKind = Literal["reasoning", "answer"]


@dataclass
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    reasoning_content: str | None = None


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
    seed: int | None = None


@dataclass
class GenerationRequest:
    messages: list[Message]
    max_new_tokens: int | None = None  # None = the runtime default
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
    # append=True: `messages` are new turns added to the session's stored history (gRPC, CLI).
    # append=False: `messages` are the whole conversation (OpenAI clients resend it every time).
    append: bool = False
    ignore_eos: bool = False  # benchmarks decode a fixed count


@dataclass
class TextDelta:
    """A piece of final text (never a broken character, never part of a stop string)."""

    text: str
    kind: TextKind
    token_ids: list[int]


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


Event = TextDelta | Finished
