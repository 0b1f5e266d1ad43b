"""Random-weight Qwen3 checkpoints with real shapes, for export and serving benchmarks:

    python -m export.random_checkpoint --shape qwen3-0.6b --output DIR [--dtype bfloat16]

Writes config.json, safetensors (numpy, tensor by tensor), generation_config.json and the
tiny-qwen3 tokenizer files (a smaller vocab than the model's, as Qwen pads its own)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.write_tokenizer(directory)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m export.random_checkpoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        write_random_checkpoint(args.output, SHAPES[args.shape], dtype=args.dtype, seed=args.seed)
    )


if __name__ == "__main__":
    main()
