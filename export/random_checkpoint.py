"""Random-weight Qwen3 checkpoints with real shapes, for export and serving benchmarks:

    python -m export.random_checkpoint --shape qwen3-0.6b --output DIR [--dtype bfloat16] \
        [--tokenizer DIR]

Writes config.json, safetensors (numpy, tensor by tensor), generation_config.json and
tokenizer files: by default the tiny-qwen3 tokenizer's (a smaller vocab than the model's, as
Qwen pads its own, so most sampled ids decode to no text); with `--tokenizer DIR`, the
tokenizer.json (or tokenizer.json.xz) and tokenizer_config.json in DIR, for example Qwen3's
real ones (tests/data/qwen3-tokenizer), so that the random model's tokens decode to text as a
trained model's would (what a serving benchmark's time to first token needs)."""

from __future__ import annotations

import argparse
import lzma
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from export import tiny
from export.synthetic import DTYPES, MAX_SHARD_BYTES, qwen3_config, write_json, write_weights

QWEN3_COMMON = {
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
}
SHAPES = {
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, **QWEN3_COMMON},
    "qwen3-1.7b": {"hidden_size": 2048, "intermediate_size": 6144, **QWEN3_COMMON},
}
QWEN3_VOCAB = 151936
# Like a freshly initialised model; the values only need to be finite and fp16-safe.
STD = {"embed": 0.02, "linear": 0.02}


def write_random_checkpoint(
    directory: Path,
    shape: dict,
    vocab_size: int = QWEN3_VOCAB,
    dtype: str = "bfloat16",
    seed: int = 0,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    tokenizer_dir: Path | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = tiny.write_tokenizer(directory)
    else:
        tokenizer = copy_tokenizer(tokenizer_dir, directory)
    write_json(directory / "generation_config.json", tiny.generation_config(tokenizer))
    config = qwen3_config(
        shape,
        vocab_size,
        tokenizer.token_to_id("<|endoftext|>"),
        tokenizer.token_to_id("<|im_end|>"),
        dtype,
    )
    write_json(directory / "config.json", config)
    write_weights(directory, config, dtype, seed, STD, max_shard_bytes)
    return directory


def copy_tokenizer(source: Path, directory: Path) -> Tokenizer:
    """Copy tokenizer.json (unpacking tokenizer.json.xz) and tokenizer_config.json from
    `source`. Raises FileNotFoundError when either is missing and ValueError when the vocabulary
    lacks Qwen's <|im_end|> and <|endoftext|>."""
    packed = source / "tokenizer.json.xz"
    if not (source / "tokenizer.json").is_file() and packed.is_file():
        with lzma.open(packed) as data:
            (directory / "tokenizer.json").write_bytes(data.read())
    else:
        shutil.copyfile(source / "tokenizer.json", directory / "tokenizer.json")
    shutil.copyfile(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for special in ("<|im_end|>", "<|endoftext|>"):
        if tokenizer.token_to_id(special) is None:
            raise ValueError(f"{source}: the tokenizer has no {special} token")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m export.random_checkpoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, help="copy this directory's tokenizer files")
    args = parser.parse_args(argv)
    print(
        write_random_checkpoint(
            args.output,
            SHAPES[args.shape],
            dtype=args.dtype,
            seed=args.seed,
            tokenizer_dir=args.tokenizer,
        )
    )


if __name__ == "__main__":
    main()
