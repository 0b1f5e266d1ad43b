"""GGUF blocks carried into onnxruntime's MatMulNBits as they are, where the two formats hold the
same numbers (llama.cpp ggml-common.h block layouts; MatMulNBits in onnxruntime's
docs/ContribOperators.md):

  Q8_0  32 x int8 q, fp16 d:         w = d * q        -> 8 bits, block 32, code q + 128, scale d
                                                          (MatMulNBits's default zero point 128)
  Q4_0  32 x 4-bit q, fp16 d:        w = d * (q - 8)  -> 4 bits, block 32, scale d
                                                          (default zero point 8)
  Q4_1  32 x 4-bit q, fp16 d and m:  w = d * q + m    -> 4 bits, block 32, scale d, zero point
                                                          0, plus m times each block's input sum

The min of Q4_1 is not a MatMulNBits zero point: those are unsigned integers (the kernel also takes
float zero points, (q - zp) * scale, but then dequantizes the whole weight on every call, 20-50x
slower on CPU). Instead x @ w^T = x @ (d * q)^T + blocksum(x) @ m^T, where blocksum(x) is x summed
over each block of 32 inputs, (B, S, K / 32): a product with K / 32 rows, next to nothing.

A GGUF block stores element j in the low nibble and j + 16 in the high nibble of byte j;
MatMulNBits packs consecutive elements, low nibble first, so the nibbles are reordered, never
recomputed. All three are exact (checked in tests/test_gguf.py); accuracy_level 4 still
quantizes the activations to int8 per block, as for any MatMulNBits weight. Other types (Q4_K,
Q5_K, Q6_K, floats) are dequantized and quantized again like a safetensors weight
(export/quantize.py).

Stacked projections (q/k/v, gate/up) are carried when all their parts have the same type: rows
are independent, so stacking the blocks row-wise is the same matrix.

A block type is carried only where it is what was asked for: its bits are the precision's (Q4_0
and Q4_1 for int4, Q8_0 for int8) and the block size is 32. Otherwise (`--precision int8` of a
Q4_1 file, `--block-size 64`) the tensor is dequantized and quantized again at the requested
precision and block size, and the manifest says "requantized".
"""

from __future__ import annotations

import numpy as np

from export.gguf_checkpoint import GGUFCheckpoint
from export.ops_fused import stacked_name
from export.quantize import HEAD_WEIGHTS, QuantizedOps

GGUF_BLOCK = 32
CARRY_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
FLOAT_TYPES = ("F32", "F16", "BF16")
# The precision a quantized GGUF exports at by default: its linear weights' most common type.
DEFAULT_PRECISION = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_K": "int8",
                     "Q6_K": "int8", "Q8_0": "int8"}  # fmt: skip


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """An fp16 field of every block as float32, (N, blocks)."""
    return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes in GGUF element order (low nibbles, then high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack4(codes: np.ndarray) -> np.ndarray:
    """MatMulNBits's 4-bit packing: element 2i in the low nibble of byte i, 2i+1 in the high."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def carry_blocks(
    ggml_type: str, raw: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw GGUF rows (N, bytes per row) uint8 -> MatMulNBits codes (N, K / 32, 32 * bits / 8)
    uint8, scales (N, K / 32) float32, and for Q4_1 the mins (N, K / 32) float32 (codes then
    have zero point 0), else None (MatMulNBits's default zero point).
    Raises KeyError for a type that does not carry over."""
    bits = CARRY_BITS[ggml_type]
    block_bytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[ggml_type]
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)  # (N, K / 32, block bytes)
    scales = _half(blocks, 0)
    if ggml_type == "Q8_0":
        codes = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return np.ascontiguousarray(codes), scales, None
    if ggml_type == "Q4_0":
        return _pack4(_nibbles(blocks[..., 2:18])), scales, None
    assert bits == 4
    return _pack4(_nibbles(blocks[..., 4:20])), scales, _half(blocks, 2)


def default_precision(checkpoint: GGUFCheckpoint) -> str | None:
    """int4 or int8 by the most common type of the linear weights; None for a float file."""
    counts: dict[str, int] = {}
    for name in checkpoint.names():
        kind = checkpoint.ggml_type(name)
        if name.endswith("_proj.weight") and kind not in FLOAT_TYPES:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return None
    return DEFAULT_PRECISION.get(max(counts, key=counts.get), "int8")


class CarriedOps(QuantizedOps):
    """QuantizedOps over a GGUF checkpoint: blocks that map exactly are carried (see the module
    docstring), the rest quantized as usual. `record` says what became of each tensor."""

    def __init__(self, b, cfg, bits: int, options):
        self._plans: dict[str, tuple[list[str], str]] = {}  # weight -> (GGUF parts, type)
        self._mins: dict[str, str] = {}  # Q4_1: the mins, (K / 32, N)
        self.record: dict[str, str] = {}
        super().__init__(b, cfg, bits, options)

    # -- what carries ----------------------------------------------------------------------------

    def carry_type(self, parts: list[str], bits: int) -> str | None:
        """The GGUF type of `parts` when their blocks carry as they are at `bits` (4 or 8) and
        the requested block size; None when they must be quantized again."""
        kinds = {self.b.checkpoint.ggml_type(p) for p in parts}
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind not in CARRY_BITS or CARRY_BITS[kind] != bits:
            return None
        if self.options.block_size != GGUF_BLOCK:
            return None
        return kind

    def head_table(self) -> str:
        return "lm_head.weight" if self.b.has_param("lm_head.weight") else HEAD_WEIGHTS[1]

    def head_carry_type(self) -> str | None:
        """The head carries at its own precision (`--head`); a tied table also feeds the
        embedding's GatherBlockQuantized, which cannot add Q4_1's per-block mins, so a tied
        Q4_1 table is quantized again."""
        if self.head_bits is None:
            return None
        table = self.head_table()
        kind = self.carry_type([table], self.head_bits)
        if kind == "Q4_1" and table == HEAD_WEIGHTS[1]:
            return None
        return kind

    def head_block_size(self) -> int:
        if self.head_carry_type():
            return GGUF_BLOCK
        return super().head_block_size()

    def block_of(self, weight: str) -> int:
        return GGUF_BLOCK if weight in self._plans else super().block_of(weight)

    # -- graph -----------------------------------------------------------------------------------

    def quantized(self, weight: str, bits: int, w: np.ndarray | None = None):
        if weight in self._quantized or weight not in self._plans:
            return super().quantized(weight, bits, w)
        parts, kind = self._plans[weight]
        ckpt = self.b.checkpoint
        carried = [carry_blocks(kind, ckpt.blocks(p)) for p in parts]
        codes = np.concatenate([c[0] for c in carried])
        scales = np.concatenate([c[1] for c in carried])
        k = scales.shape[1] * GGUF_BLOCK
        names = (
            self.b.external(f"{weight}.q{bits}", codes),
            self.b.external(f"{weight}.scales", scales.astype(self.b.dtype)),
        )
        if carried[0][2] is not None:
            mins = np.concatenate([c[2] for c in carried]).T.astype(self.b.dtype)  # (K/32, N)
            self._mins[weight] = self.b.external(f"{weight}.mins", np.ascontiguousarray(mins))
            zero_points = np.zeros(len(codes) * -(-scales.shape[1] // 2), np.uint8)  # packed
            self._zeros[weight] = self.b.external(f"{weight}.zero_points", zero_points)
        self._quantized[weight] = (*names, bits, (len(codes), k))
        return super().quantized(weight, bits)

    def matmul_nbits(self, x: str, weight: str, bits: int, w: np.ndarray | None = None) -> str:
        """QuantizedOps' MatMulNBits (block_of and quantized give the carried blocks), plus, for
        Q4_1, each block's min times the block sums of x."""
        y = super().matmul_nbits(x, weight, bits, w)  # (B, S, N)
        b = self.b
        if weight not in self._mins:
            return y
        blocks = b.node("Reshape", [x, b.const([0, 0, -1, GGUF_BLOCK])], f"{weight}/blocks")
        sums = b.node("ReduceSum", [blocks, b.const([-1])], f"{weight}/block_sums", keepdims=0)
        offset = b.node("MatMul", [sums, self._mins[weight]], f"{weight}/mins")  # (B, S, N)
        return b.node("Add", [y, offset], f"{weight}/Add_mins")

    def projections(self, x: str, names: list[str]) -> list[str]:
        parts = [f"{n}.weight" for n in names]
        if names == ["lm_head"]:  # at the head's own precision: see dense
            return super().projections(x, names)
        kind = self.carry_type(parts, self.bits)
        if kind is None:
            self.note(parts, "requantized")
            return super().projections(x, names)
        weight = f"{stacked_name(names)}.weight"
        self._plans[weight] = (parts, kind)
        self.note(parts, "carried")
        y = self.matmul_nbits(x, weight, CARRY_BITS[kind])
        sizes = [len(self.b.checkpoint.blocks(p)) for p in parts]
        return self.bias_and_split(y, names, sizes)

    def tied_head(self, x: str, table: str, name: str) -> str:
        self.plan_head(table)
        return super().tied_head(x, table, name)

    def embedding(self, ids: str, table: str, name: str) -> str:
        self.plan_head(table)
        out = super().embedding(ids, table, name)
        if table not in self._quantized:
            self.note([table], "float")
        return out

    def dense(self, x: str, weight: str, w: np.ndarray) -> str:
        if weight == "lm_head.weight":
            self.plan_head(weight)
        return super().dense(x, weight, w)

    def plan_head(self, table: str) -> None:
        if table != self.head_table() or self.head_bits is None:
            return
        kind = self.head_carry_type()
        if kind and table not in self._plans:
            self._plans[table] = ([table], kind)
        self.note([table], "carried" if kind else "requantized")

    def note(self, tensors: list[str], what: str) -> None:
        for tensor in tensors:
            self.record.setdefault(tensor, what)


def weights_record(checkpoint: GGUFCheckpoint, ops) -> dict[str, dict]:
    """For the manifest: every GGUF tensor's type and what the artifact stores it as
    ("carried": the GGUF blocks as they are; "requantized": dequantized, then quantized to
    MatMulNBits; "float": dequantized to the graph's float type)."""
    record = getattr(ops, "record", {})
    return {
        name: {"gguf_type": checkpoint.ggml_type(name), "stored": record.get(name, "float")}
        for name in checkpoint.names()
    }
