"""int4/int8 weights: block-wise quantization of the linear layers into onnxruntime's
MatMulNBits (com.microsoft), on top of the fused cpu/cuda graph.

Each row of a weight W (N out x K in, the checkpoint's layout) is cut into blocks of
`block_size` along K; a block keeps one float scale s, `bits`-bit codes q and a zero point z, and
MatMulNBits computes with w = s * (q - z). Two ways to choose them:

  symmetric (int8 always; int4 `plain`): z = 2^(bits-1), MatMulNBits's default (no zero-point
        tensor); int4 s = (the block's value of largest magnitude) / -8, q - 8 =
        clip(round(w / s), -8, 7) (llama.cpp's Q4_0 rule: the extreme maps exactly onto -8);
        int8 s = max|w| / 127, q - 128 = round(w / s) in [-127, 127].
  asymmetric (int4 `asym` and `mix`): z in 0..15 per block (a uint4 zero-point tensor), s and z
        searched per block to minimise the weighted squared error sum_i c_i (s (q_i - z) - w_i)^2
        with c_i = rms(block) + |w_i|: llama.cpp's make_qkx2_quants as Q4_K uses it without an
        importance matrix (ggml/src/ggml-quants.c: 21 trial scales (15 + rmin + rdelta * step)
        / (max - min), rmin = -1, rdelta = 0.1, each refitted by weighted least squares), with
        the zero point held to an integer as MatMulNBits stores it (the offset -s z in place of
        Q4_K's free 6-bit min) and the scale refitted once more for that integer.

`gptq` makes mix's choices, then rounds the int4 weights of a safetensors
checkpoint against a calibration text: AWQ scales folded into the preceding norms and rows, and
GPTQ's error-compensated rounding with the same zero-point blocks (export/calibrate.py,
export/gptq.py). A GGUF source (its blocks carried over where they can be) is not calibrated.

`mix` (the int4 default) keeps the matmuls that int4 hurts most at 8 bits: see
`int8_in_mix`, chosen by measured KL-divergence (docs/benchmarks.md, "int4 quality"), as
llama.cpp's Q4_K_M keeps attn_v and ffn_down of some layers at Q6_K.

Codes are packed along K, low nibble first for int4: B is (N, K / block_size, block_size * bits
/ 8) uint8, scales (N, K / block_size), int4 zero points (N, ceil(K / block_size / 2)) uint8 two a
byte, low nibble first; K is zero-padded to a whole block.

lm_head (and a tied embedding table, which is the same tensor) has its own precision
(`GraphOptions.head`, int8 by default: it measurably helps quality over int4, see
docs/benchmarks.md): fp32 keeps the float matmul; int8/int4 quantize it like the linears (int8
tensors in the widest block up to 128 that divides K, see `int8_block`), and a tied embedding
then reads the same quantized rows through GatherBlockQuantized, so the table is stored once.

q/k/v and gate/up are quantized stacked (export/ops_fused.py): rows are quantized independently,
so stacking changes nothing numerically, and one MatMulNBits replaces two or three.
"""

from __future__ import annotations

import re

import numpy as np

from export.gptq import quantize_gptq
from export.ops_fused import MS, FusedOps

ROWS_PER_CHUNK = 8192  # bounds export memory for the 151936-row embedding
SEARCH_ELEMENTS = 1 << 16  # blocks searched at once: temporaries stay in the CPU cache
INT8_BLOCK = 128  # the widest block for int8 weights, see int8_block
HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")  # the latter when tied
# make_qkx2_quants's search as Q4_K calls it: trial inverse scales (nmax + rmin + rdelta * i) /
# (max - min) for i in 0..steps.
SEARCH_RMIN, SEARCH_RDELTA, SEARCH_STEPS = -1.0, 0.1, 20


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float -> packed codes (N, K_blocks, block_size * bits / 8) uint8 and scales
    (N, K_blocks) float32."""
    n, k = w.shape
    blocks = -(-k // block_size)
    packed = np.empty((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, min(n, start + ROWS_PER_CHUNK))
        packed[rows], scales[rows] = _quantize_rows(w[rows], bits, block_size, blocks)
    return packed, scales


def _quantize_rows(w: np.ndarray, bits: int, block_size: int, blocks: int):
    x = np.zeros((w.shape[0], blocks * block_size), np.float32)
    x[:, : w.shape[1]] = w.astype(np.float32)
    x = x.reshape(w.shape[0], blocks, block_size)
    if bits == 4:
        extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        scale, low, high = extreme / -8.0, -8, 7
    else:
        scale, low, high = np.abs(x).max(-1) / 127.0, -127, 127
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    codes = np.clip(np.rint(x / scale[..., None]), low, high).astype(np.int16) + (1 << (bits - 1))
    codes = codes.astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float weight (N, K) that MatMulNBits computes with, for checks."""
    if bits == 4:
        codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    else:
        codes = packed
    w = (codes.astype(np.float32) - (1 << (bits - 1))) * scales[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


def quantize_asymmetric(
    w: np.ndarray, block_size: int, search: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, K) float -> int4 codes (N, K_blocks, block_size / 2) uint8, scales (N, K_blocks)
    float32 and zero points (N, ceil(K_blocks / 2)) uint8, for w = s * (q - z) (module doc).
    search=False keeps the plain min-max fit (s = (max - min) / 15), for comparison."""
    n, k = w.shape
    blocks = -(-k // block_size)
    packed = np.empty((n, blocks, block_size // 2), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, -(-blocks // 2)), np.uint8)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, min(n, start + ROWS_PER_CHUNK))
        x = _blocks(w[rows], block_size, blocks)
        flat = x.reshape(-1, block_size)
        step = max(1, SEARCH_ELEMENTS // block_size)
        fits = [_fit_asymmetric(flat[i : i + step], search) for i in range(0, len(flat), step)]
        scale, zero, codes = (np.concatenate(part) for part in zip(*fits, strict=True))
        codes = codes.reshape(x.shape)
        packed[rows] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales[rows] = scale.reshape(x.shape[:2])
        zeros[rows] = pack_nibbles(zero.reshape(x.shape[:2]))
    return packed, scales, zeros


def _blocks(w: np.ndarray, block_size: int, blocks: int) -> np.ndarray:
    """(R, K) -> (R, blocks, block_size) float32, K zero-padded."""
    x = np.zeros((w.shape[0], blocks * block_size), np.float32)
    x[:, : w.shape[1]] = w.astype(np.float32)
    return x.reshape(w.shape[0], blocks, block_size)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """(R, C) values 0..15 -> (R, ceil(C / 2)) uint8, low nibble first (MatMulNBits's int4
    zero-point layout)."""
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    values = values.astype(np.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def _fit_asymmetric(x: np.ndarray, search: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks (R, B) float32 -> scale (R,), zero point (R,) and codes (R, B), the last two
    integers 0..15; the weighted-error search of the module doc (make_qkx2_quants). Each trial's
    error comes in closed form from sums the refit already needs."""
    nmax = np.float32(15)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    span = np.where(hi > lo, hi - lo, np.float32(1))
    weight = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)  # (R, B)
    wx = weight * x
    sw, sx, sxx = weight.sum(-1), wx.sum(-1), (wx * x).sum(-1)
    trials = SEARCH_RMIN + SEARCH_RDELTA * np.arange(SEARCH_STEPS + 1) if search else [0.0]
    best_error = np.full(len(x), np.inf, np.float32)
    best_scale, best_zero = span / nmax, np.zeros(len(x), np.float32)
    for trial in trials:
        iscale = np.float32(nmax + trial) / span
        levels = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        scale, low = (1 / iscale, lo) if not search else _least_squares(levels, weight, wx, sw, sx)
        zero = np.clip(np.rint(-low / scale), 0, nmax)
        offset = np.clip(np.rint(x / scale[:, None] + zero[:, None]), 0, nmax) - zero[:, None]
        wo = weight * offset
        den, num = (wo * offset).sum(-1), (wo * x).sum(-1)
        if search:  # refit the scale for the integer offsets
            refit = num / np.where(den > 0, den, 1)
            scale = np.where((den > 0) & (refit > 0), refit, scale)
        error = scale * scale * den - 2 * scale * num + sxx  # sum c (s * offset - x)^2
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    flat = hi <= lo  # every weight equals min(0, min w): q = 0, z = 15 gives exactly that
    scale = np.where(flat, np.where(lo < 0, -lo / nmax, 1), best_scale).astype(np.float32)
    zero = np.where(flat, np.where(lo < 0, nmax, 0), best_zero)
    codes = np.clip(np.rint(x / scale[:, None] + zero[:, None]), 0, nmax)
    codes = np.where(flat[:, None], 0, codes)
    return scale, zero.astype(np.uint8), codes.astype(np.uint8)


def _least_squares(levels, weight, wx, sw, sx) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares x ~ scale * levels + low with low <= 0, per block (R,); where
    the system is singular or the scale not positive, NaN (the trial then never wins)."""
    wl = weight * levels
    sl, sl2, sxl = wl.sum(-1), (wl * levels).sum(-1), (wx * levels).sum(-1)
    det = sw * sl2 - sl * sl
    scale = (sw * sxl - sx * sl) / np.where(det > 0, det, 1)
    low = (sl2 * sx - sl * sxl) / np.where(det > 0, det, 1)
    positive_low = low > 0
    scale = np.where(positive_low, sxl / np.where(sl2 > 0, sl2, 1), scale)
    low = np.where(positive_low, 0, low)
    ok = (det > 0) & (scale > 0)
    return np.where(ok, scale, np.nan), np.where(ok, low, 0)


def dequantize_asymmetric(
    packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int
) -> np.ndarray:
    """The float weight (N, K) that MatMulNBits computes with from int4 codes, scales and
    packed zero points (quantize_asymmetric's layout)."""
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    zero = np.stack([zeros & 0xF, zeros >> 4], axis=-1).reshape(len(zeros), -1)
    zero = zero[:, : packed.shape[1]]
    w = (codes.astype(np.float32) - zero[..., None]) * scales[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


def quantize_calibrated(
    w: np.ndarray, hessian: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_asymmetric's output and layout, with the codes rounded by GPTQ against the
    inputs' Hessian (K, K) (export/gptq.py); K is zero-padded to a whole block (the padded
    inputs never fire)."""
    n, k = w.shape
    blocks = -(-k // block_size)
    pad = blocks * block_size - k
    w = np.pad(np.asarray(w, np.float32), ((0, 0), (0, pad)))
    hessian = np.pad(hessian, ((0, pad), (0, pad)))
    codes, scales, zeros = quantize_gptq(w, hessian, block_size)
    codes = codes.reshape(n, blocks, block_size)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scales, pack_nibbles(zeros)


def int8_block(k: int, block_size: int) -> int:
    """The block of an int8 tensor with K inputs in an int4 graph: the widest power of two up
    to INT8_BLOCK that divides K, and never narrower than the graph's block. Fewer float32
    scales mean fewer bits a weight (8.25 in blocks of 128, 8.5 in 64, 9 in 32) and a faster
    MatMulNBits; beside int4 layers the int8 tensors' own error is small either way."""
    block = INT8_BLOCK
    while block > block_size and k % block:
        block //= 2
    return max(block, block_size)


LAYER = re.compile(r"\.layers\.(\d+)\.")


def projection_of(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.down_proj(.weight)' -> (3, 'down_proj'); a stacked weight
    ('...self_attn.q_proj+k_proj.weight') answers for its first projection; None outside the
    layers (lm_head, the embedding)."""
    match = LAYER.search(name)
    if not match:
        return None
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return int(match.group(1)), leaf.split("+")[0]


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's rule for which layers a k-quant mix gives more bits (src/llama-quant.cpp,
    `use_more_bits`): the first and last eighth, and every third layer between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


# The `mix` scheme's int8 projections and their layers (MIX_LAYERS). Measured on
# SmolLM2-135M (docs/benchmarks.md, "int4 quality"): per bit, v_proj at int8 removes 4x more
# KL than down_proj or k_proj and 20x more than o_proj or gate/up; down_proj in the middle and
# last layers more than in the first ones; blocks of 64 save bits but cost more KL than they buy.
MIX_INT8 = {"v_proj": "all", "down_proj": "more_past_first_eighth"}
MIX_LAYERS = {
    "all": lambda layer, n: True,
    "more": use_more_bits,
    "more_past_first_eighth": lambda layer, n: layer >= n // 8 and use_more_bits(layer, n),
}


def int8_in_mix(name: str, num_layers: int) -> bool:
    """Whether the `mix` scheme keeps this projection (or stacked weight) at 8 bits (MIX_INT8)."""
    projection = projection_of(name)
    if projection is None or projection[1] not in MIX_INT8:
        return False
    return MIX_LAYERS[MIX_INT8[projection[1]]](projection[0], num_layers)


class QuantizedOps(FusedOps):
    """MatMulNBits weights. Subclasses (a GGUF import carrying its own blocks) may override
    head_block_size, block_of, quantized and matmul_nbits; `_quantized` maps a weight to
    (codes, scales, bits, (N, K)) initializer names, with int4 zero points in `_zeros` and the
    block of each stored weight in `_blocks`."""

    def __init__(self, b, cfg, bits: int, options):
        super().__init__(b, cfg)
        self.bits = bits
        self.options = options
        self.head_bits = {"fp32": None, "int8": 8, "int4": 4}[options.head]
        self._quantized: dict[str, tuple] = {}  # weight -> (codes, scales, bits, (N, K))
        self._zeros: dict[str, str] = {}  # weight -> its zero-point initializer (asymmetric)
        self._blocks: dict[str, int] = {}  # weight -> the block it is stored with
        self.head_block = self.head_block_size()
        if self.calibrates():
            self.b.checkpoint = self.calibrated_checkpoint()

    def calibrates(self) -> bool:
        """int4 `gptq` from a safetensors checkpoint (its tokenizer.json tokenizes the
        calibration text): AWQ scales and GPTQ rounding (export/calibrate.py)."""
        directory = getattr(self.b.checkpoint, "directory", None)
        return (
            self.bits == 4
            and self.options.int4 == "gptq"
            and directory is not None
            and (directory / "tokenizer.json").is_file()
        )

    def calibrated_checkpoint(self):
        from export.calibrate import CalibratedCheckpoint, calibration_tokens

        checkpoint = self.b.checkpoint
        tokens = calibration_tokens(checkpoint.directory / "tokenizer.json", self.cfg.vocab_size)
        return CalibratedCheckpoint(
            checkpoint, self.cfg, tokens, lambda n: self.bits_of(n) == 4, self.options.block_size
        )

    def head_block_size(self) -> int:
        """The head's block (and a tied embedding's): block_for at the head's bits and K."""
        return self.block_for(HEAD_WEIGHTS[0], self.head_bits or self.bits, self.cfg.hidden_size)

    def bits_of(self, weight: str) -> int:
        """A layer weight's (or projection's) bits: the graph's, but 8 for the int4 `mix`
        scheme's chosen projections (int8_in_mix)."""
        if self.bits == 4 and self.options.int4 in ("mix", "gptq"):
            return 8 if int8_in_mix(weight, self.cfg.num_layers) else 4
        return self.bits

    def projections(self, x: str, names: list[str]) -> list[str]:
        """Stacks only projections of equal bits: the mix may keep v_proj at 8 bits beside
        int4 q_proj and k_proj (then q+k are one matmul and v another)."""
        groups: list[tuple[int, list[str]]] = []
        for name in names:
            bits = self.bits_of(name)
            if groups and groups[-1][0] == bits:
                groups[-1][1].append(name)
            else:
                groups.append((bits, [name]))
        outputs = []
        for _, group in groups:  # one group: exactly FusedOps's stacked matmul
            outputs += super().projections(x, group)
        return outputs

    def block_of(self, weight: str) -> int:
        """The block a weight is stored with (the head's for the head, else the graph's until
        it is quantized)."""
        if weight in self._blocks:
            return self._blocks[weight]
        return self.head_block if weight in HEAD_WEIGHTS else self.options.block_size

    def block_for(self, weight: str, bits: int, k: int) -> int:
        """The block to quantize a weight with K inputs in: the graph's for int4 tensors. int8
        tensors of an int4 graph (the mix's projections, the head) take the widest block that
        divides K (int8_block): there bits are the budget. An int8 graph's head takes blocks of
        INT8_BLOCK where they divide K, and its layers the graph's block: on SmolLM2 (K 576) an
        int8 head in blocks of 64 instead of 32 raised the int8 graph's KL from 0.0043 to
        0.0057 (docs/benchmarks.md). The tied embedding reads the head's blocks."""
        block = self.options.block_size
        if bits != 8:
            return block
        if self.bits == 4:
            return int8_block(k, block)
        if weight in HEAD_WEIGHTS and k % INT8_BLOCK == 0:
            return max(block, INT8_BLOCK)
        return block

    @property
    def session_config(self) -> dict[str, str]:
        """MatMulNBits needs its weights prepacked (unpacked it is 40x slower here), which costs
        about 2 ns a weight at session creation; the thread pool shares that work."""
        return {"session.prepack.enable_parallel": "1"}

    def asymmetric(self, weight: str, bits: int) -> bool:
        """Zero points for the layers' int4 weights under `mix` and `asym`. An int4 head stays
        symmetric: a tied table is also read by GatherBlockQuantized, which this graph feeds
        no zero points."""
        layer = weight not in HEAD_WEIGHTS
        return bits == 4 and layer and self.options.int4 in ("gptq", "mix", "asym")

    def quantized(self, weight: str, bits: int, w: np.ndarray | None = None) -> tuple:
        """Quantize a weight (N, K) once (from the checkpoint unless given); returns the
        initializer names of its codes and scales, and (N, K)."""
        if weight not in self._quantized:
            w = self.b.checkpoint.tensor(weight) if w is None else w
            k = w.shape[1]
            block = self.head_block if weight in HEAD_WEIGHTS else self.block_for(weight, bits, k)
            calibrated = getattr(self.b.checkpoint, "quantized", lambda name: None)(weight)
            if self.asymmetric(weight, bits) and calibrated is not None:
                packed, scales, zero_points = calibrated
                self._zeros[weight] = self.b.external(f"{weight}.zero_points", zero_points)
            elif self.asymmetric(weight, bits):
                packed, scales, zero_points = quantize_asymmetric(w, block)
                self._zeros[weight] = self.b.external(f"{weight}.zero_points", zero_points)
            else:
                packed, scales = quantize_blockwise(w, bits, block)
            codes = self.b.external(f"{weight}.q{bits}", packed)
            scale = self.b.external(f"{weight}.scales", scales.astype(self.b.dtype))
            self._quantized[weight] = (codes, scale, bits, w.shape)
            self._blocks[weight] = block
        codes, scale, stored_bits, shape = self._quantized[weight]
        assert stored_bits == bits, f"{weight} is already stored with {stored_bits} bits"
        return codes, scale, shape

    def matmul_nbits(self, x: str, weight: str, bits: int, w: np.ndarray | None = None) -> str:
        codes, scales, (n, k) = self.quantized(weight, bits, w)
        zeros = [self._zeros[weight]] if weight in self._zeros else []
        return self.b.node(
            "MatMulNBits",
            [x, codes, scales, *zeros],
            f"{weight}/MatMulNBits",
            domain=MS,
            K=k,
            N=n,
            bits=bits,
            block_size=self.block_of(weight),
            accuracy_level=self.options.accuracy_level,
        )

    def dense(self, x: str, weight: str, w: np.ndarray) -> str:
        if weight == "lm_head.weight":
            if self.head_bits is None:
                return super().dense(x, weight, w)
            return self.matmul_nbits(x, weight, self.head_bits, w)
        return self.matmul_nbits(x, weight, self.bits_of(weight), w)

    def tied_head(self, x: str, table: str, name: str) -> str:
        if self.head_bits is None:
            return super().tied_head(x, table, name)
        return self.matmul_nbits(x, table, self.head_bits)  # (B, N, V)

    def embedding(self, ids: str, table: str, name: str) -> str:
        """A tied table quantized for the head is read back row by row with
        GatherBlockQuantized straight from MatMulNBits's (V, blocks, bytes) codes: the last axis
        holds one block, so only the scales need a reshape (V, blocks, 1), not a copy of the
        codes. Whole blocks only: the hidden size must divide into them."""
        b, cfg = self.b, self.cfg
        tied = cfg.tie_word_embeddings or not b.has_param("lm_head.weight")
        if not tied or self.head_bits is None or cfg.hidden_size % self.head_block:
            return super().embedding(ids, table, name)
        codes, scales, _ = self.quantized(table, self.head_bits)
        scales = b.node(
            "Reshape", [scales, b.const([cfg.vocab_size, -1, 1])], f"{name}/Reshape_scales"
        )  # (V, blocks, 1)
        rows = b.node(
            "GatherBlockQuantized",
            [codes, ids, scales],
            f"{name}/Gather",
            domain=MS,
            bits=self.head_bits,
            block_size=self.head_block,
            gather_axis=0,
            quantize_axis=2,
        )  # (B, S, blocks, block_size)
        return b.node("Reshape", [rows, b.const([0, 0, cfg.hidden_size])], f"{name}/Reshape")
