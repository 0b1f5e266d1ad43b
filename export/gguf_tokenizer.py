"""The tokenizer files of a GGUF export, built from the file's metadata: tokenizer.json,
tokenizer_config.json (chat template, bos/eos) and generation_config.json, the files the runtime
already loads.

The vocabulary is converted by transformers' GGUF tokenizer converter
(transformers.integrations.gguf, `convert_gguf_tokenizer`, since transformers 5),
which knows llama.cpp's byte-level BPE ("gpt2") and SentencePiece ("llama") vocabularies and
their pre-tokenizers. That module needs transformers and tokenizers but not torch; it comes with
the `gguf` extra. Serving never imports it: the artifact holds plain tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from export.gguf_checkpoint import GGUFCheckpoint, field_value
from fermi.errors import FermiError, ModelNotFound

EXTRA_HINT = "pip install 'fermi[gguf]'"


class MissingExtra(FermiError):
    """An optional dependency group is not installed; the message names it."""


def converter():
    """transformers' convert_gguf_tokenizer and its metadata key map, or MissingExtra."""
    # Without torch, importing transformers advises installing it; export does not need it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        raise MissingExtra(
            f"reading a GGUF file's tokenizer needs transformers' converter: {EXTRA_HINT}"
        ) from None
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def tokenizer_metadata(ckpt: GGUFCheckpoint, mapping: dict) -> tuple[dict, dict]:
    """(tokenizer_dict, tokenizer_config) under transformers' names, from `tokenizer.*` keys."""
    fields = ckpt.reader.fields
    grouped = {}
    for group, renames in mapping.items():
        grouped[group] = {
            name: field_value(fields[f"tokenizer.{key}"])
            for key, name in renames.items()
            if f"tokenizer.{key}" in fields
        }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer:
        raise ModelNotFound(f"{ckpt.path.name} has no tokenizer (tokenizer.ggml.tokens)")
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for SentencePiece
    return tokenizer, config


def write_tokenizer_files(ckpt: GGUFCheckpoint, directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json into `directory`.

    Raises MissingExtra without transformers, ModelNotFound for a file without a vocabulary or
    with one the converter does not know."""
    mapping, convert = converter()
    tokenizer_dict, config = tokenizer_metadata(ckpt, mapping)
    try:
        tokenizer, extra = convert(ckpt.arch, tokenizer_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelNotFound(
            f"{ckpt.path.name}: cannot build its tokenizer: {str(e).splitlines()[0]}"
        ) from None
    tokenizer.save(str(directory / "tokenizer.json"))
    tokens = tokenizer_dict["tokens"]

    def token(key: str) -> str | None:
        index = tokenizer_dict.get(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    config.update(
        {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unk_token_id"),
            "pad_token": token("pad_token_id"),
            "clean_up_tokenization_spaces": False,
            "model_max_length": ckpt.config["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    )
    config.update({k: v for k, v in extra.items() if isinstance(v, str | bool | int)})
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "generation_config.json", generation_config(ckpt, tokenizer_dict))


# GGUF `general.sampling.*` (the model maker's advice, written by recent llama.cpp converters)
# -> generation_config.json's names.
SAMPLING = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "penalty_repeat": "repetition_penalty",
}


def generation_config(ckpt: GGUFCheckpoint, tokenizer_dict: dict) -> dict:
    """bos/eos/pad ids (eos plus the end-of-turn token when the file names one) and the
    sampling defaults the file carries."""
    eos = [tokenizer_dict.get("eos_token_id")]
    for key in ("eot_token_id", "eom_token_id"):
        field = ckpt.reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field_value(field) not in eos:
            eos.append(field_value(field))
    eos = [e for e in eos if e is not None]
    generation = {
        "bos_token_id": tokenizer_dict.get("bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": tokenizer_dict.get("pad_token_id"),
    }
    sampling = {
        name: ckpt.metadata[f"general.sampling.{key}"]
        for key, name in SAMPLING.items()
        if f"general.sampling.{key}" in ckpt.metadata
    }
    if sampling:
        generation |= {"do_sample": sampling.get("temperature", 1.0) > 0, **sampling}
    return generation


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
