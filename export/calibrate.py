"""Calibration for int4: a short text (export/data/calibration.txt, never an evaluation text) run
through the float model in numpy, layer by layer, gives each linear layer's input statistics:

  - the Hessian H = X^T X (K, K) of its inputs X (T tokens, K), which GPTQ rounds against
    (export/gptq.py);
  - activation-aware scales (AWQ: Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for
    LLM Compression and Acceleration"): per input channel s = mean|x|^alpha, alpha searched on a
    grid for the smallest output error tr(dW H dW^T) of the int4 weights (the plain zero-point
    fit: the search only ranks alphas). The weights' columns are multiplied by s and the inputs
    divided by s where that is free: folded into the RMSNorm weight before q/k/v and before
    gate/up, into v_proj's rows before o_proj (one scale per kv-head channel, shared by the
    query heads that read it), and into up_proj's rows before down_proj.

The float model here is the decoder of export/decoder.py (RMSNorm, q/k/v with optional biases
and Qwen3's per-head q/k norm, RoPE, grouped-query causal attention, SwiGLU MLP), on the
checkpoint's own weights: the statistics are the float model's at every layer.

`CalibratedCheckpoint` wraps a checkpoint: it serves the scaled weights in place of the
checkpoint's (the graph is built from them unchanged) and each layer's Hessians to the int4
quantizer, computing a layer when its first tensor is read (the decoder reads layers in order).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.architectures import ModelConfig, inv_freq, rope_attention_factor

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
CHUNK = 512  # tokens per calibration sequence
MAX_TOKENS = 2048  # calibration tokens used at most
ALPHAS = np.linspace(0.0, 1.0, 11)  # AWQ's grid (alpha 0: no scaling)
SEARCH_ROWS = 1024  # rows of a weight the alpha search measures at most (evenly spread)
AWQ_GROUPS = ("attn", "o", "mlp", "down")  # the inputs that get AWQ scales (GROUPS)
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# input group -> (the projections that read it, the tensors its scale divides)
GROUPS = {
    "attn": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    "o": (("self_attn.o_proj",), "self_attn.v_proj"),
    "mlp": (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    "down": (("mlp.down_proj",), "mlp.up_proj"),
}
GROUP_OF = {p.rsplit(".", 1)[-1]: group for group, (projs, _) in GROUPS.items() for p in projs}


def calibration_tokens(tokenizer_file: Path, vocab_size: int, text: Path = CALIBRATION_TEXT):
    """The calibration text's token ids in chunks, (C, CHUNK) int64, at most MAX_TOKENS; ids at
    or past `vocab_size` (a random-weight checkpoint with a smaller vocabulary than its
    tokenizer) wrap around. Raises ValueError when the text has fewer than CHUNK tokens."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text.read_text()).ids
    chunks = min(len(ids), MAX_TOKENS) // CHUNK
    if chunks == 0:
        raise ValueError(f"{text} has {len(ids)} tokens; calibration needs {CHUNK}")
    return np.asarray(ids[: chunks * CHUNK], np.int64).reshape(chunks, CHUNK) % vocab_size


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, float32."""
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE, transformers' rotate_half layout: x (C, T, heads, D), cos/sin (T, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention: q (C, T, heads, D), k/v (C, T, kv_heads, D) ->
    (C, T, heads * D)."""
    c, t, heads, d = q.shape
    groups = heads // k.shape[2]
    q = q.transpose(0, 2, 1, 3)  # (C, heads, T, D)
    k, v = (np.repeat(x, groups, 2).transpose(0, 2, 1, 3) for x in (k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d))  # (C, heads, T, T)
    scores += np.triu(np.full((t, t), -np.inf, np.float32), 1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    return (scores @ v).transpose(0, 2, 1, 3).reshape(c, t, heads * d)


class Statistics:
    """An input's Hessian X^T X (K, K) float64 and mean |x| per channel (K,)."""

    def __init__(self, x: np.ndarray):
        flat = x.reshape(-1, x.shape[-1])
        self.hessian = (flat.T @ flat).astype(np.float64)
        self.mean_abs = np.abs(flat).mean(0)


def awq_scale(weights: list[np.ndarray], stats: Statistics, tie: Callable | None = None):
    """AWQ's per-input-channel scale (K,) float64 for the weights (each (N_i, K)) that read one
    input: s = mean|x|^alpha / sqrt(max * min), the alpha of ALPHAS with the smallest
    tr(dW H dW^T) where dW = Q(W diag(s)) diag(1/s) - W and Q is the plain zero-point int4 fit
    in blocks of 32. `tie` maps a scale to one it can take (o_proj's inputs: shared by the
    query heads of a kv head). Alpha 0 (s = 1) is always a candidate."""
    from export.quantize import dequantize_asymmetric, quantize_asymmetric

    w = np.concatenate(weights)
    w = w[:: max(1, len(w) // SEARCH_ROWS)].astype(np.float32)
    best, best_error = np.ones(w.shape[1]), np.inf
    for alpha in ALPHAS:
        s = np.maximum(stats.mean_abs.astype(np.float64), 1e-8) ** alpha
        s = tie(s) if tie else s
        s = s / np.sqrt(s.max() * s.min())
        scaled = (w * s).astype(np.float32)
        q = dequantize_asymmetric(*quantize_asymmetric(scaled, 32, search=False), w.shape[1])
        delta = q / s - w
        error = float(np.sum((delta @ stats.hessian) * delta))
        if error < best_error:
            best, best_error = s, error
    return best


class CalibratedCheckpoint:
    """A checkpoint whose layer weights carry AWQ scales (module doc) and whose int4
    projections are rounded by GPTQ in blocks of `block_size` (`quantized`). `int4(name)` says
    whether a projection is int4 (only those are scaled for and rounded here). Other
    attributes pass through to `checkpoint`.

    Every layer is calibrated on the float model's activations. Rounding each layer against
    the outputs of the layers already quantized (GPTQ's sequential mode) was measured worse on
    SmolLM2-135M (KL 0.103 against 0.099, docs/benchmarks.md) and costs a second pass."""

    def __init__(
        self,
        checkpoint,
        cfg: ModelConfig,
        tokens: np.ndarray,
        int4: Callable[[str], bool],
        block_size: int = 32,
    ):
        self._checkpoint = checkpoint
        self.cfg = cfg
        self.int4 = int4
        self.block_size = block_size
        self._x = None  # the float residual stream (C, T, H) entering layer `_next`
        self._tokens = tokens
        self._next = 0
        self._scales: dict[int, dict[str, np.ndarray]] = {}  # layer -> group -> (K,)
        self._quantized: dict[str, tuple] = {}  # the latest layer's: name -> packed triple
        freqs = np.arange(tokens.shape[1], dtype=np.float32)[:, None] * inv_freq(cfg)[None, :]
        factor = np.float32(rope_attention_factor(cfg))
        self._rope = np.cos(freqs) * factor, np.sin(freqs) * factor

    def __getattr__(self, name: str):
        return getattr(self._checkpoint, name)

    def __contains__(self, name: str) -> bool:
        return name in self._checkpoint

    def __len__(self) -> int:
        return len(self._checkpoint)

    def _base(self, name: str) -> np.ndarray:
        return np.asarray(self._checkpoint.tensor(name), np.float32)

    def tensor(self, name: str) -> np.ndarray:
        """The checkpoint's tensor, with its layer's AWQ scales applied: a projection's columns
        multiplied by its input's scale, a norm weight (or v_proj / up_proj rows and bias)
        divided by the scale of the input it feeds."""
        match = LAYER.match(name)
        if not match:
            return self._checkpoint.tensor(name)
        layer, leaf = int(match.group(1)), match.group(2)
        scales = self._layer_scales(layer)
        kind = leaf.rsplit(".", 1)[-1]  # weight or bias
        module = leaf.removesuffix(f".{kind}")
        tensor = self._base(name)
        proj = module.rsplit(".", 1)[-1]
        if kind == "weight" and proj in GROUP_OF:
            tensor = tensor * scales[GROUP_OF[proj]][None, :].astype(np.float32)
        for group, (_, divided) in GROUPS.items():
            if module == divided:
                s = self._divisor(group, scales[group]).astype(np.float32)
                tensor = tensor / (s[:, None] if tensor.ndim == 2 else s)
        return tensor

    def quantized(self, weight: str) -> tuple | None:
        """GPTQ's int4 packing of a projection or stacked weight ('model.layers.3.self_attn.
        q_proj+k_proj.weight': its parts' rows stacked), in quantize_asymmetric's layout, or
        None for weights not rounded here (outside the layers, or not int4). Raises
        RuntimeError for a layer already left behind (the decoder reads layers in order)."""
        match = LAYER.match(weight)
        if not match:
            return None
        first, *others = weight.removesuffix(".weight").split("+")
        module = first.rsplit(".", 1)[0]
        names = [f"{first}.weight"] + [f"{module}.{other}.weight" for other in others]
        if not all(self.int4(name) for name in names):
            return None
        self._layer_scales(int(match.group(1)))
        if any(name not in self._quantized for name in names):
            raise RuntimeError(f"calibration of {weight} was already released")
        parts = [self._quantized[name] for name in names]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))

    def _layer_scales(self, layer: int) -> dict[str, np.ndarray]:
        while layer not in self._scales:  # set before the layer's quantized pass
            self._calibrate_next()
        return self._scales[layer]

    def _calibrate_next(self) -> None:
        """Layer `_next`: the float layer's input statistics choose the AWQ scales, then GPTQ
        rounds the scaled int4 projections against their scaled inputs' Hessians; keeps the
        packed codes (the previous layer's are released) and the float stream entering the
        next layer."""
        i = self._next
        if self._x is None:
            self._x = self._base("model.embed_tokens.weight")[self._tokens]
        stats: dict[str, Statistics] = {}
        observe = lambda group, x: stats.setdefault(group, Statistics(x))  # noqa: E731
        x = self._layer(i, self._x, self._base, observe)
        scales = {group: self._awq_scale(i, group, stats[group]) for group in GROUPS}
        self._scales[i] = scales
        self._quantized = {}
        for group, st in stats.items():
            self._round(i, group, st.hessian / np.outer(scales[group], scales[group]))
        self._x = x
        self._next += 1

    def _awq_scale(self, i: int, group: str, stats: Statistics) -> np.ndarray:
        names = [f"model.layers.{i}.{p}.weight" for p in GROUPS[group][0]]
        weights = [self._base(n) for n in names if self.int4(n)]
        if group not in AWQ_GROUPS or not weights:
            return np.ones(stats.hessian.shape[0])
        return awq_scale(weights, stats, self._tie_kv if group == "o" else None)

    def _round(self, i: int, group: str, hessian: np.ndarray) -> None:
        """GPTQ for the group's int4 projections against their input's Hessian."""
        from export.quantize import quantize_calibrated

        for proj in GROUPS[group][0]:
            name = f"model.layers.{i}.{proj}.weight"
            if self.int4(name):
                self._quantized[name] = quantize_calibrated(
                    self.tensor(name), hessian, self.block_size
                )

    def _divisor(self, group: str, s: np.ndarray) -> np.ndarray:
        """The scale as the tensor it divides sees it: v_proj's rows (kv_heads * D,) for
        o_proj's input scale (heads * D,), whose query heads of one kv head share it."""
        if group != "o":
            return s
        cfg = self.cfg
        return s.reshape(cfg.num_kv_heads, -1, cfg.head_dim)[:, 0].reshape(-1)

    def _tie_kv(self, s: np.ndarray) -> np.ndarray:
        """o_proj's input scale (heads * D,) averaged over the query heads of each kv head: it
        divides v_proj's rows, which each such group reads."""
        cfg = self.cfg
        groups = cfg.num_heads // cfg.num_kv_heads
        kv = s.reshape(cfg.num_kv_heads, groups, cfg.head_dim).mean(1, keepdims=True)
        return np.broadcast_to(kv, (cfg.num_kv_heads, groups, cfg.head_dim)).reshape(-1)

    def _layer(self, i: int, x: np.ndarray, weight: Callable, observe: Callable) -> np.ndarray:
        """One decoder block on x (C, T, H) with the tensors `weight(name)` gives; calls
        `observe(group, input)` with each input group's input before its projections read
        their weights. Returns the block's output."""
        cfg, p, eps = self.cfg, f"model.layers.{i}", self.cfg.rms_norm_eps
        c, t, _ = x.shape

        def linear(h: np.ndarray, name: str) -> np.ndarray:
            y = h @ weight(f"{name}.weight").T
            return y + weight(f"{name}.bias") if f"{name}.bias" in self else y

        h = rms_norm(x, weight(f"{p}.input_layernorm.weight"), eps)
        observe("attn", h)
        q = linear(h, f"{p}.self_attn.q_proj").reshape(c, t, cfg.num_heads, -1)
        k = linear(h, f"{p}.self_attn.k_proj").reshape(c, t, cfg.num_kv_heads, -1)
        v = linear(h, f"{p}.self_attn.v_proj").reshape(c, t, cfg.num_kv_heads, -1)
        if f"{p}.self_attn.q_norm.weight" in self:
            q = rms_norm(q, weight(f"{p}.self_attn.q_norm.weight"), eps)
            k = rms_norm(k, weight(f"{p}.self_attn.k_norm.weight"), eps)
        a = attention(rotate(q, *self._rope), rotate(k, *self._rope), v)
        observe("o", a)
        x = x + linear(a, f"{p}.self_attn.o_proj")
        h = rms_norm(x, weight(f"{p}.post_attention_layernorm.weight"), eps)
        observe("mlp", h)
        gate = linear(h, f"{p}.mlp.gate_proj")
        m = 0.5 * gate * (1 + np.tanh(0.5 * gate)) * linear(h, f"{p}.mlp.up_proj")  # silu
        observe("down", m)
        return x + linear(m, f"{p}.mlp.down_proj")
