"""int4/int8 weights: block-wise symmetric quantization of the linear layers into onnxruntime's
MatMulNBits (com.microsoft), on top of the fused cpu/cuda graph.

Each row of a weight W (N out x K in, the checkpoint's layout) is cut into blocks of
`block_size` along K; a block keeps one float scale and `bits`-bit codes, stored with
MatMulNBits's default zero point 2^(bits-1) (so no zero-point tensor):

  int4  scale = (the block's value of largest magnitude) / -8, code = clip(round(w / scale), -8, 7)
        (llama.cpp's Q4_0 rule: the extreme value maps exactly onto -8)
  int8  scale = max|w| / 127, code = round(w / scale), in [-127, 127]

Codes are packed along K, low nibble first for int4: B is (N, K / block_size, block_size * bits
/ 8) uint8, scales (N, K / block_size); K is zero-padded to a whole block.

lm_head (and a tied embedding table, which is the same tensor) has its own precision
(`GraphOptions.head`, int8 by default: it measurably helps quality over int4, see
docs/benchmarks.md): fp32 keeps the float matmul; int8/int4 quantize it like the linears (an int8
head in blocks of 128, see QuantizedOps.head_block_size), and a tied embedding then reads the
same quantized rows through GatherBlockQuantized, so the table is stored once.

q/k/v and gate/up are quantized stacked (export/ops_fused.py): rows are quantized independently,
so stacking changes nothing numerically, and one MatMulNBits replaces two or three.
"""

from __future__ import annotations

import numpy as np

from export.ops_fused import MS, FusedOps

ROWS_PER_CHUNK = 8192  # bounds export memory for the 151936-row embedding
HEAD_INT8_BLOCK = 128  # see QuantizedOps.head_block_size
HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")  # the latter when tied


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


class QuantizedOps(FusedOps):
    def __init__(self, b, cfg, bits: int, options):
        super().__init__(b, cfg)
        self.bits = bits
        self.options = options
        self.head_bits = {"fp32": None, "int8": 8, "int4": 4}[options.head]
        self._quantized: dict[str, tuple] = {}  # weight -> (codes, scales, bits, (N, K))
        self.head_block = self.head_block_size()

    def head_block_size(self) -> int:
        """An int8 head is quantized in blocks of HEAD_INT8_BLOCK rather than the graph's
        block: int8's 255 levels leave little error for smaller blocks to remove (the same KL
        against fp32 on the Qwen3-0.6B shape) and MatMulNBits, compute-bound at batch 1, runs the
        151936-row head faster with fewer scales (2-5% of a decode step). The tied embedding
        reads whole blocks, so a hidden size that the larger block does not divide keeps the
        graph's."""
        block = self.options.block_size
        if self.head_bits == 8 and self.cfg.hidden_size % HEAD_INT8_BLOCK == 0:
            return max(block, HEAD_INT8_BLOCK)
        return block

    def block_of(self, weight: str) -> int:
        return self.head_block if weight in HEAD_WEIGHTS else self.options.block_size

    @property
    def session_config(self) -> dict[str, str]:
        """MatMulNBits needs its weights prepacked (unpacked it is 40x slower here), which costs
        about 2 ns a weight at session creation; the thread pool shares that work."""
        return {"session.prepack.enable_parallel": "1"}

    def quantized(
        self, weight: str, bits: int, w: np.ndarray | None = None
    ) -> tuple[str, str, tuple]:
        """Quantize a weight (N, K) once (from the checkpoint unless given); returns the
        initializer names and (N, K)."""
        if weight not in self._quantized:
            w = self.b.checkpoint.tensor(weight) if w is None else w
            packed, scales = quantize_blockwise(w, bits, self.block_of(weight))
            codes = self.b.external(f"{weight}.q{bits}", packed)
            scale = self.b.external(f"{weight}.scales", scales.astype(self.b.dtype))
            self._quantized[weight] = (codes, scale, bits, w.shape)
        codes, scale, stored_bits, shape = self._quantized[weight]
        assert stored_bits == bits, f"{weight} is already stored with {stored_bits} bits"
        return codes, scale, shape

    def matmul_nbits(self, x: str, weight: str, bits: int, w: np.ndarray | None = None) -> str:
        codes, scales, (n, k) = self.quantized(weight, bits, w)
        return self.b.node(
            "MatMulNBits",
            [x, codes, scales],
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
        return self.matmul_nbits(x, weight, self.bits, w)

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
