"""tiny-qwen3: a Qwen3-architecture checkpoint that fermi builds itself, deterministically and
offline, so that export, serving and tests run anywhere. Random weights from a fixed seed; a
small byte-level BPE tokenizer trained on the corpus shipped beside this file, carrying Qwen3's
special and think/tool tokens by their real strings; Qwen3's chat template behaviour."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    processors,
    trainers,
)
from tokenizers import pre_tokenizers as pre

from export.staging import staged_directory
from export.synthetic import qwen3_config, write_json, write_weights
from fermi.settings import Settings, load_settings

NAME = "tiny-qwen3"
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # != hidden_size / heads on purpose, as in the real Qwen3 family
    "max_position_embeddings": 4096,
}
SEED = 0
# A fresh model's 0.02 makes the residual stream echo the last input token forever (tied
# embeddings); with these, greedy output wanders over ~30 distinct tokens per 40 and the logits
# (std ~1.6) are peaked enough for sampling to be meaningful.
STD = {"embed": 0.2, "linear": 0.25}
BPE_VOCAB = 1200
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Not "special": they survive skip_special_tokens decoding, as in Qwen3's tokenizer.
MARKUP = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs, single digits, punctuation
# runs, newlines, and whitespace.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# What the checkpoint is made from; their hash is its revision, so that a changed recipe
# rebuilds the cached checkpoint and the artifacts exported from it instead of reusing them.
HERE = Path(__file__).parent
RECIPE = (
    HERE / "__init__.py",
    HERE / "corpus.txt",
    HERE / "chat_template.jinja",
    HERE.parent / "synthetic.py",
)
REVISION = "builtin-" + hashlib.sha256(b"".join(p.read_bytes() for p in RECIPE)).hexdigest()[:12]
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _data(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(SPLIT), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, show_progress=False, initial_alphabet=pre.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_data("corpus.txt").splitlines(keepends=True), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL,
        }
        for t in SPECIAL + MARKUP
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": _data("chat_template.jinja"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": SHAPE["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(directory: Path) -> Tokenizer:
    """tokenizer.json and tokenizer_config.json; also used for the random real-shape
    checkpoints, whose vocab is larger than this tokenizer's (as Qwen pads its own)."""
    tokenizer = train_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", tokenizer_config(tokenizer))
    return tokenizer


def generation_config(tokenizer: Tokenizer) -> dict:
    """Qwen3's sampling defaults; generation stops at either <|im_end|> or <|endoftext|>."""
    return {
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "do_sample": True,
        "eos_token_id": [
            tokenizer.token_to_id("<|im_end|>"),
            tokenizer.token_to_id("<|endoftext|>"),
        ],
        "pad_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


def build(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(directory)
    # Rounded up to a multiple of 64, as Qwen pads its embedding beyond the tokenizer.
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config = qwen3_config(
        SHAPE,
        vocab_size,
        tokenizer.token_to_id("<|endoftext|>"),
        tokenizer.token_to_id("<|im_end|>"),
    )
    write_json(directory / "config.json", config)
    write_json(directory / "generation_config.json", generation_config(tokenizer))
    write_weights(directory, config, "bfloat16", SEED, STD)
    (directory / "fermi-tiny.txt").write_text(REVISION + "\n")


def is_built(directory: Path) -> bool:
    stamp = directory / "fermi-tiny.txt"
    return (
        stamp.is_file()
        and stamp.read_text().strip() == REVISION
        and all((directory / f).is_file() for f in FILES)
    )


def checkpoint_path(settings: Settings | None = None) -> Path:
    """The tiny-qwen3 checkpoint under `<artifacts>/.checkpoints/`, built there (in a temporary
    sibling, then renamed) when missing or from an older recipe."""
    settings = settings or load_settings()
    directory = Path(settings.artifacts) / ".checkpoints" / NAME
    if is_built(directory):
        return directory
    with staged_directory(directory) as staging:
        build(staging)
    return directory
