"""What the runtime needs to know about a model family, read from the artifact rather than the
model's name: the detokenizer kind, the reasoning and tool-call tags, and where the sampling
defaults come from. Export writes these into the manifest (`family_fields`); a manifest written
before they existed gets the same values inferred from the artifact's tokenizer and template
when it is read.

Sampling defaults (fermi.sampling.sampling_defaults, the one place this is decided):
  1. the model's own generation_config.json, when it sets any of temperature, top_p, top_k,
     min_p, repetition_penalty (or `do_sample: false`, which means greedy);
  2. else the family's advice, which the architecture spec carries (export/architectures.py;
     Qwen3: thinking T 0.6, top_p 0.95, top_k 20; non-thinking T 0.7, top_p 0.8, top_k 20, from
     the Qwen3 model cards) and export records in the manifest as `sampling_advice`;
  3. else neutral values, OpenAI's and vLLM's: temperature 1, top_p 1, top_k off, min_p 0,
     repetition_penalty 1.
Request values override all of them (fermi.sampling.resolve_sampling).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fermi.chat_template import ChatTemplate, infer_reasoning_tags, infer_tool_call_tags
from fermi.errors import ArtifactError
from fermi.sampling import sampling_defaults

REASONING_TAGS = ["<think>", "</think>"]


def detokenizer_kind(tokenizer_json: Mapping) -> str | None:
    """ "byte_level" (GPT-2 style byte-level BPE: Qwen, Llama 3, SmolLM) or "sentencepiece"
    (`▁` for spaces, byte fallback: Llama 2, Mistral), from tokenizer.json's decoder and
    pre-tokenizer; None for anything else."""
    text = json.dumps([tokenizer_json.get("decoder"), tokenizer_json.get("pre_tokenizer")])
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or '"ByteFallback"' in text or "\u2581" in text:
        return "sentencepiece"
    return None


def _vocab_has(tokenizer_json: Mapping, tokens: list[str]) -> bool:
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    added = {t.get("content") for t in tokenizer_json.get("added_tokens") or []}
    return all(t in added or (isinstance(vocab, dict) and t in vocab) for t in tokens)


def _template_source(directory: Path) -> str:
    try:
        return ChatTemplate.from_dir(directory).source
    except ArtifactError:
        return ""


def family_fields(
    directory: Path, supports_thinking: bool, sampling_advice: Mapping | None
) -> dict:
    """The manifest's family fields for an artifact (or checkpoint) directory holding
    tokenizer.json, the chat template and generation_config.json: detokenizer,
    reasoning_tags (["<think>", "</think>"] when the template or the vocabulary has them),
    tool_call_tags and tool_call_format (Hermes-style `<tool_call>` tags when the template writes
    them), sampling_advice (the family's, from the architecture spec) and sampling_defaults (the
    source that applies, thinking off)."""
    directory = Path(directory)
    tokenizer = _read_json(directory / "tokenizer.json")
    source = _template_source(directory)
    reasoning = infer_reasoning_tags(source, supports_thinking)
    if reasoning is None and _vocab_has(tokenizer, REASONING_TAGS):
        reasoning = list(REASONING_TAGS)
    tool_tags, tool_format = infer_tool_call_tags(source)
    generation = _read_json(directory / "generation_config.json")
    return {
        "detokenizer": detokenizer_kind(tokenizer),
        "reasoning_tags": reasoning,
        "tool_call_tags": tool_tags,
        "tool_call_format": tool_format,
        "sampling_advice": dict(sampling_advice) if sampling_advice else None,
        "sampling_defaults": sampling_defaults(generation, sampling_advice, False)[1],
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
