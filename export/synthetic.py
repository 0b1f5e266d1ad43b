"""Synthetic Qwen3 checkpoints: a config.json like Qwen's own and random weights written with
numpy, tensor by tensor, straight into safetensors files (no torch, no whole-model buffer)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from export.checkpoint import INDEX_FILE

DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
SAFETENSORS_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Real Qwen checkpoints shard at a few GB; the reader handles one file or an index alike.
MAX_SHARD_BYTES = 4 << 30


def qwen3_config(
    shape: dict, vocab_size: int, bos_token_id: int, eos_token_id: int, dtype: str = "bfloat16"
) -> dict:
    """config.json in the form Qwen3 checkpoints ship it (rope_theta + rope_scaling null)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": shape["num_hidden_layers"],
        "model_type": "qwen3",
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        **shape,
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen3ForCausalLM checkpoint with its shape, in checkpoint order."""
    hidden, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (hidden, q),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for i in range(config["num_hidden_layers"]):
        shapes += [(f"model.layers.{i}.{name}", shape) for name, shape in per_layer.items()]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (config["vocab_size"], hidden)))
    return shapes


def random_tensor(
    rng: np.random.Generator, name: str, shape: tuple[int, ...], std: dict[str, float]
) -> np.ndarray:
    """Norm weights around 1 (as trained models have them), the rest N(0, std) where `std`
    maps "embed" and "linear" to a standard deviation."""
    if name.endswith("norm.weight"):
        return rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
    values = rng.standard_normal(size=shape, dtype=np.float32)
    values *= std["embed"] if "embed_tokens" in name else std["linear"]
    return values


def _header(tensors: list[tuple[str, tuple[int, ...]]], dtype: str) -> bytes:
    header, offset = {}, 0
    for name, shape in tensors:
        size = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {
            "dtype": SAFETENSORS_TAGS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes


def write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, make
) -> None:
    """A safetensors file whose header is computed from the shapes first, so each tensor from
    `make(name, shape)` can be written and dropped in turn."""
    blob = _header(tensors, dtype)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            tensor = np.ascontiguousarray(make(name, shape), dtype=DTYPES[dtype])
            f.write(tensor.reshape(-1).view(np.uint8))  # a bytes view: no bf16 buffer protocol


def _shards(tensors: list, dtype: str, max_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_weights(
    directory: Path,
    config: dict,
    dtype: str,
    seed: int,
    std: dict[str, float],
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Random weights for `config`, deterministic for a seed: model.safetensors, or numbered
    shards plus model.safetensors.index.json when they exceed `max_shard_bytes`."""
    rng = np.random.default_rng(seed)
    shards = _shards(tensor_shapes(config), dtype, max_shard_bytes)
    weight_map = {}
    for n, tensors in enumerate(shards, start=1):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else (f"model-{n:05d}-of-{len(shards):05d}.safetensors")
        )
        write_safetensors(
            directory / file,
            tensors,
            dtype,
            lambda name, shape: random_tensor(rng, name, shape, std),
        )
        weight_map.update({name: file for name, _ in tensors})
    if len(shards) > 1:
        total = sum(math.prod(s) for _, s in tensor_shapes(config)) * DTYPES[dtype].itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
