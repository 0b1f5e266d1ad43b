"""Write a Qwen3 safetensors checkpoint as an f32 GGUF with the `gguf` package (GGUFWriter and
its tensor-name map), for llama.cpp. llama.cpp's own converter refuses tokenizers it does not
recognise by hash; here the byte-level BPE vocabulary and merges go in directly, with Qwen2's
pre-tokenizer name, padded to the model's vocab size as Qwen pads its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ARCH = "qwen3"


def write_gguf(checkpoint: Path, output: Path) -> Path:
    import gguf

    config = json.loads((checkpoint / "config.json").read_text())
    writer = gguf.GGUFWriter(str(output), ARCH)
    _add_hparams(writer, gguf, config, checkpoint.name)
    _add_tokenizer(writer, gguf, checkpoint, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config["num_hidden_layers"])
    for name, tensor in read_tensors(checkpoint):
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"no GGUF name for checkpoint tensor {name}")
        writer.add_tensor(mapped, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def read_tensors(checkpoint: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array in the checkpoint's dtype) for every tensor of every *.safetensors file,
    memory-mapped by safetensors' own numpy reader (bf16 as ml_dtypes.bfloat16)."""
    import ml_dtypes  # noqa: F401  registers bfloat16 for the reader
    from safetensors import safe_open

    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _add_hparams(writer, gguf, config: dict, name: str) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.get("rope_theta", 1_000_000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _add_tokenizer(writer, gguf, checkpoint: Path, config: dict) -> None:
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab_size = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in tokenizer["model"]["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(_eos(checkpoint, config))
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(config["bos_token_id"])
    writer.add_add_bos_token(False)
    template = checkpoint / "chat_template.jinja"
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    chat_template = template.read_text() if template.is_file() else settings.get("chat_template")
    if chat_template:
        writer.add_chat_template(chat_template)


def _eos(checkpoint: Path, config: dict) -> int:
    generation = checkpoint / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = eos if eos is not None else config["eos_token_id"]
    return eos[0] if isinstance(eos, list) else eos
