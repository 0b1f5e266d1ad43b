"""Supported architecture families and the config fields the graph needs.

A family is a small spec, not a branch in the builder: the decoder blocks read the spec's flags.
Biases need no flag: a linear layer gets one wherever the checkpoint has `<name>.bias` (Qwen2's
q/k/v projections, Qwen3 with attention_bias)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.rope import Rope, read_rope, rope_parameters
from fermi.errors import UnsupportedArchitecture

# Qwen3's advice (Qwen3 model cards, "Best Practices"): thinking mode T 0.6, top_p 0.95, top_k 20,
# min_p 0 (do not decode greedily); non-thinking T 0.7, top_p 0.8, top_k 20, min_p 0. It applies
# only when a checkpoint's generation_config.json sets no sampling values (fermi/family.py).
QWEN3_SAMPLING = {
    "thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    "non_thinking": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}


@dataclass(frozen=True)
class Architecture:
    name: str  # the `architectures` entry in config.json
    model_type: str
    qk_norm: bool  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # The family's advised sampling defaults by mode ({"thinking": {...}, "non_thinking": {...}}),
    # recorded in the manifest; None: the family advises nothing.
    sampling_advice: dict | None = None


REGISTRY = {
    arch.name: arch
    for arch in (
        Architecture("Qwen3ForCausalLM", "qwen3", qk_norm=True, sampling_advice=QWEN3_SAMPLING),
        Architecture("Qwen2ForCausalLM", "qwen2", qk_norm=False),
        Architecture("LlamaForCausalLM", "llama", qk_norm=False),
        # Mistral's decoder is Llama's; only checkpoints without a sliding window are built.
        Architecture("MistralForCausalLM", "mistral", qk_norm=False),
    )
}


@dataclass(frozen=True)
class ModelConfig:
    """The config.json fields that shape the graph, checked once."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool
    rope: Rope = Rope()  # scaling type and parameters (export/rope.py)


def find_architecture(config: dict) -> Architecture:
    names = config.get("architectures") or []
    by_type = [a for a in REGISTRY.values() if a.model_type == config.get("model_type")]
    for name in names:
        if name in REGISTRY:
            return REGISTRY[name]
    # save_pretrained of a bare config writes no `architectures`; model_type still identifies it.
    if not names and by_type:
        return by_type[0]
    found = ", ".join(names) or config.get("model_type") or "unknown"
    raise UnsupportedArchitecture(
        f"architecture {found} is not supported; fermi exports {', '.join(REGISTRY)}"
    )


def check_sliding_window(config: dict) -> None:
    """Refuse sliding-window attention. Qwen2 configs carry a window switched off by
    `use_sliding_window: false`; Mistral's `sliding_window` is null from v0.2 on, and a window at
    least as long as the context never slides."""
    if "use_sliding_window" in config:
        sliding = bool(config["use_sliding_window"])
    else:
        window = config.get("sliding_window")
        sliding = window is not None and window < config.get("max_position_embeddings", 32768)
    if sliding:
        raise UnsupportedArchitecture(
            "sliding-window attention is not supported (sliding_window must be null)"
        )


def model_config(config: dict) -> ModelConfig:
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture(
            f"hidden_act {config['hidden_act']!r} is not supported; only silu is"
        )
    check_sliding_window(config)
    heads = config["num_attention_heads"]
    return ModelConfig(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=(rope := read_rope(config)).theta,
        context_length=config.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope=rope,
    )


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies over pairs of the head dim, (D/2,) float32, scaled as the
    config's rope type asks (export/rope.py)."""
    return rope_parameters(cfg.rope, cfg.head_dim, cfg.context_length)[0]


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin (1 except for YaRN)."""
    return rope_parameters(cfg.rope, cfg.head_dim, cfg.context_length)[1]
