"""Rotary position embedding parameters: the inverse frequencies and the cos/sin scale that a
config's RoPE type asks for, computed as transformers computes them
(`transformers/modeling_rope_utils.py`: `_compute_default_rope_parameters`,
`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
`_compute_yarn_parameters`), in float32 with the same order of operations.

Every graph target applies RoPE as cos(pos * inv_freq) and sin(pos * inv_freq), each multiplied
by `attention_factor` (1 except for YaRN), so the scaling types differ only in these numbers:

- `default`: inv_freq[i] = theta^(-2i / D).
- `linear`: inv_freq / factor (position interpolation).
- `llama3`: Llama 3.1's band-wise scaling: wavelengths above original_max / low_freq_factor are
  divided by `factor`, those below original_max / high_freq_factor kept, the band between
  interpolated smoothly.
- `yarn`: a ramp between interpolated and extrapolated frequencies over the dims between the
  beta_fast and beta_slow rotation counts, and cos/sin scaled by 0.1 ln(factor) + 1.
- `dynamic` (dynamic NTK): transformers recomputes theta only for positions at or beyond
  max_position_embeddings; every position the graph serves is below it (the artifact's context
  is max_position_embeddings), where dynamic equals `default`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fermi.errors import UnsupportedArchitecture

SUPPORTED = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class Rope:
    """A config's RoPE: theta, the scaling type and its parameters (`factor`, ...)."""

    theta: float = 10000.0
    rope_type: str = "default"
    params: dict = field(default_factory=dict)


def read_rope(config: dict) -> Rope:
    """The RoPE of a config.json: newer transformers write `rope_parameters: {rope_type,
    rope_theta, factor, ...}`, older ones `rope_theta` plus `rope_scaling: {type | rope_type,
    factor, ...}` or null. Raises UnsupportedArchitecture for a type fermi does not build (one
    line naming the type and the supported ones) or a partial rotary factor."""
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"rope type {rope_type!r} is not supported; fermi builds {', '.join(SUPPORTED)}"
        )
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedArchitecture(f"partial_rotary_factor {partial} is not supported")
    if rope_type in ("llama3", "yarn"):
        # transformers' standardize_rope_params: the pretraining length defaults to the config's.
        params.setdefault(
            "original_max_position_embeddings",
            config.get("original_max_position_embeddings")
            or config.get("max_position_embeddings", 32768),
        )
    if rope_type in ("linear", "llama3", "dynamic") and "factor" not in params:
        raise UnsupportedArchitecture(f"rope type {rope_type!r} needs a `factor`")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return Rope(theta=float(theta), rope_type=rope_type, params=params)


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """theta^(-2i / D) for i < D/2, (D/2,) float32."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)


def llama3_inv_freq(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    f32 = np.float32
    factor = f32(params["factor"])
    low, high = f32(params["low_freq_factor"]), f32(params["high_freq_factor"])
    old_context = f32(params["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(rope: Rope, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    p, dim, base = rope.params, head_dim, rope.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    extrapolation = np.float32(1) - np.clip(ramp, 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extrapolation = np.float32(1) / pos_freqs
    inv_interpolation = np.float32(1) / (np.float32(factor) * pos_freqs)
    inv_freq = (
        inv_interpolation * (np.float32(1) - extrapolation) + inv_extrapolation * extrapolation
    )
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_parameters(rope: Rope, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    """(inv_freq (D/2,) float32, attention_factor) for a head dim D; see the module docstring."""
    inv_freq = default_inv_freq(rope.theta, head_dim)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.params["factor"])).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        return llama3_inv_freq(inv_freq, rope.params), 1.0
    if rope.rope_type == "yarn":
        return yarn_parameters(rope, head_dim, max_positions)
    return inv_freq, 1.0  # default, and dynamic within max_position_embeddings
