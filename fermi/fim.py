"""Fill-in-the-middle prompts for /v1/completions' `suffix`.

A model can fill in the middle when its vocabulary has the three FIM tokens of a known family;
the prompt is then rendered prefix-suffix-middle (PSM), the order those models were trained on:
`<prefix token>{prefix}<suffix token>{suffix}<middle token>`, and the model writes the middle.
Families, by the spelling of their tokens (taken from the vocabulary, never the model name):
Qwen2.5-Coder / Qwen3 (`<|fim_prefix|>`), StarCoder / SmolLM (`<fim_prefix>`), DeepSeek-Coder
(`<｜fim▁begin｜>`, with hole and end between)."""

from __future__ import annotations

from collections.abc import Mapping

from fermi.errors import InvalidRequest

FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


def fim_tokens(vocab: Mapping[str, int]) -> tuple[str, str, str] | None:
    """The (prefix, suffix, middle) tokens the vocabulary has, or None."""
    return next((family for family in FAMILIES if all(t in vocab for t in family)), None)


def render_fim(tokens: tuple[str, str, str] | None, prefix: str, suffix: str) -> str:
    """The PSM prompt; InvalidRequest (param `suffix`) when the model has no FIM tokens."""
    if tokens is None:
        raise InvalidRequest(
            "suffix needs a model with fill-in-the-middle tokens; this one has none",
            param="suffix",
        )
    begin, hole, end = tokens
    return f"{begin}{prefix}{hole}{suffix}{end}"
