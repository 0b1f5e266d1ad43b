"""A GGUF file (llama.cpp's format) read as a checkpoint: the same interface as
export/checkpoint.py's Checkpoint (a config.json-shaped `config`, `name in checkpoint`,
`tensor(hf_name)`), so the decoder builds the same graph from either.

The file is read with the `gguf` package (llama.cpp's own reader, memory-mapped). Tensors are
named as Hugging Face checkpoints name them; quantized ones are dequantized with
`gguf.quants.dequantize` for float graphs, and their raw blocks are also offered (`blocks`) so
export/gguf_carry.py can carry exactly-mapping blocks into MatMulNBits.

llama.cpp's converter permutes the rows of attn_q and attn_k for the `llama` architecture
(convert_hf_to_gguf.py, LlamaModel.permute: per head, the two rotary halves are interleaved);
`tensor` and `blocks` undo it as transformers does (modeling_gguf_pytorch_utils.py,
LlamaTensorProcessor._reverse_permute_weights). It moves whole rows, so quantized blocks, which
run along a row, stay intact.

Config keys follow gguf-py's names (GGUF spec, "LLM" metadata): `{arch}.embedding_length`,
`{arch}.attention.head_count`, `{arch}.rope.freq_base` ...; see `config_from_metadata`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from fermi.errors import ModelNotFound, UnsupportedArchitecture

# GGUF `general.architecture` -> the transformers class export/architectures.py knows.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Tensor types this reader takes: floats as they are, the rest dequantized (or carried over).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Per-frequency RoPE divisors that llama.cpp writes for Llama 3.x rope scaling; the config's
# rope_scaling says the same (see `llama3_rope_scaling`).
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    return f"{GLOBAL_NAMES[base]}.{kind}" if base in GLOBAL_NAMES else None


def field_value(field):
    """A metadata field as Python values: a str/int/float/bool, or a list of them."""
    import gguf

    values = [field.parts[i] for i in field.data]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(v).decode("utf-8", errors="replace") for v in values]
    else:
        values = [v.item() if v.size == 1 else v.tolist() for v in values]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation; `rows` is (N, ...) with N = heads * head_dim."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class GGUFCheckpoint:
    """Config and weights of one .gguf file; use as a context manager.

    Raises ModelNotFound for a file that is not a readable GGUF, UnsupportedArchitecture for an
    architecture, tensor or tensor type fermi does not export."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.metadata = {
            name: field_value(f)
            for name, f in self.reader.fields.items()
            if not name.startswith("tokenizer.ggml.")
        }
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"GGUF architecture {self.arch or 'unknown'} is not supported; fermi exports "
                f"{', '.join(ARCHITECTURES)}"
            )
        self._tensors = self._index_tensors()
        self.config = config_from_metadata(self)

    def _index_tensors(self) -> dict:
        tensors = {}
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                continue
            name = hf_name(tensor.name)
            if name is None:
                raise UnsupportedArchitecture(
                    f"{self.path.name}: tensor {tensor.name} has no place in a {self.arch} decoder"
                )
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise UnsupportedArchitecture(
                    f"{self.path.name}: tensor {tensor.name} is {tensor.tensor_type.name}; fermi "
                    f"reads {', '.join(SUPPORTED_TYPES)}"
                )
            tensors[name] = tensor
        return tensors

    def gguf_tensor(self, gguf_name: str):
        return next((t for t in self.reader.tensors if t.name == gguf_name), None)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        """The number of tensors in the file."""
        return len(self._tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def ggml_type(self, name: str) -> str:
        """The GGUF tensor type of an HF-named tensor: "F32", "Q4_1" ..."""
        return self._tensors[name].tensor_type.name

    def _heads_to_unpermute(self, name: str) -> int | None:
        if self.arch != "llama":
            return None
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return self.config["num_attention_heads"]
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            return self.config["num_key_value_heads"]
        return None

    def blocks(self, name: str) -> np.ndarray:
        """The raw bytes of a quantized tensor, (N, bytes per row) uint8, rows in HF order."""
        data = np.asarray(self._tensors[name].data)
        heads = self._heads_to_unpermute(name)
        return unpermute_rows(data, heads) if heads else data

    def tensor(self, name: str) -> np.ndarray:
        """An HF-named tensor as float32 (N, K) or (N,), dequantized if stored quantized."""
        import gguf

        t = self._tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            w = np.asarray(t.data, dtype=np.float32)
        else:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists ne0 (K) first
        heads = self._heads_to_unpermute(name)
        return unpermute_rows(w, heads) if heads else w

    def close(self) -> None:
        pass  # the reader's memory map goes with the object

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: Path) -> GGUFCheckpoint:
    """The GGUFCheckpoint of `path`, parsed once per process while the file is unchanged
    (reading the metadata of a 50k-token vocabulary takes seconds)."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _open_cached(path, stat and (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, _version) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


def open_reader(path: Path):
    """gguf.GGUFReader, with an unreadable or truncated file as one ModelNotFound line."""
    import gguf

    if not path.is_file():
        raise ModelNotFound(f"{path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError, EOFError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFound(f"{path} is not a readable GGUF file: {reason}") from None


def _required(meta: dict, key: str, path: Path):
    if key not in meta:
        raise ModelNotFound(f"{path.name} lacks GGUF metadata {key}")
    return meta[key]


def config_from_metadata(ckpt: GGUFCheckpoint) -> dict:
    """A config.json dict (transformers' names) from the GGUF metadata and tensor shapes."""
    meta, arch, path = ckpt.metadata, ckpt.arch, ckpt.path

    def key(name: str, default=None):
        return meta.get(f"{arch}.{name}", default)

    hidden = _required(meta, f"{arch}.embedding_length", path)
    heads = _required(meta, f"{arch}.attention.head_count", path)
    embed = ckpt._tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise ModelNotFound(f"{path.name} has no token_embd.weight tensor")
    tokens = ckpt.reader.fields.get("tokenizer.ggml.tokens")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": _required(meta, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _required(meta, f"{arch}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
        "vocab_size": int(embed.shape[1]),
        "tie_word_embeddings": "lm_head.weight" not in ckpt._tensors,
        "bos_token_id": _token_id(ckpt, "bos_token_id"),
        "eos_token_id": _token_id(ckpt, "eos_token_id"),
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in ckpt._tensors,
        "torch_dtype": "float32",
    }
    if tokens is not None and len(tokens.data) > config["vocab_size"]:
        raise ModelNotFound(
            f"{path.name}: the vocabulary has {len(tokens.data)} tokens but token_embd only "
            f"{config['vocab_size']} rows"
        )
    scaling = rope_scaling(ckpt, config)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _token_id(ckpt: GGUFCheckpoint, name: str) -> int | None:
    field = ckpt.reader.fields.get(f"tokenizer.ggml.{name}")
    return None if field is None else int(field_value(field))


def rope_scaling(ckpt: GGUFCheckpoint, config: dict) -> dict | None:
    """`{arch}.rope.scaling.type` linear/yarn with its factor, or Llama 3's scaling recovered
    from the rope_freqs tensor; None for plain RoPE."""
    meta, arch = ckpt.metadata, ckpt.arch
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if ckpt.gguf_tensor(ROPE_FREQS) is not None:
        return llama3_rope_scaling(ckpt, config, original)
    if kind in ("none", None):
        return None
    scaling = {"rope_type": kind, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_rope_factors(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """The per-frequency divisors of Llama 3 rope scaling, as llama.cpp's converter writes them
    into rope_freqs (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def llama3_rope_scaling(ckpt: GGUFCheckpoint, config: dict, original) -> dict:
    """rope_freqs holds only the resulting divisors; Llama 3.x always used low 1 and high 4
    (and an original context of 8192 when the file does not say), so that guess is checked
    against the tensor and refused when it does not reproduce it."""
    factors = np.asarray(ckpt.gguf_tensor(ROPE_FREQS).data, dtype=np.float64)
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original or 8192),
    }
    dim = config["head_dim"]
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors.shape != inv.shape or not np.allclose(
        llama3_rope_factors(inv, scaling), factors, rtol=1e-4
    ):
        raise UnsupportedArchitecture(
            f"{ckpt.path.name}: its rope_freqs tensor is not Llama 3 rope scaling with low/high "
            "frequency factors 1 and 4; fermi cannot rebuild it"
        )
    return scaling
