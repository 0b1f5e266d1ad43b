"""Op choices for one graph target. The decoder blocks say *what* to compute; an ops object says
*with which ONNX ops*. `PortableOps` uses standard opset-18 ops only, so CPU, CUDA and CoreML
execution providers can all run it; fused-op or quantized targets subclass it and override the
few methods that change (linear, rms_norm, attention ...)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from export.graph import GraphBuilder

FLOAT = TensorProto.FLOAT


class PortableOps:
    def __init__(self, b: GraphBuilder):
        self.b = b

    def to_float(self, x: str, name: str) -> str:
        """Cast to float32 for a step that needs its range; a no-op in the float32 graph."""
        if self.b.dtype == np.float32:
            return x
        return self.b.node("Cast", [x], f"{name}/Cast_float", to=FLOAT)

    def from_float(self, x: str, name: str) -> str:
        if self.b.dtype == np.float32:
            return x
        return self.b.node("Cast", [x], f"{name}/Cast_back", to=self.b.onnx_dtype)

    def embedding(self, ids: str, table: str, name: str) -> str:
        return self.b.node("Gather", [table, ids], f"{name}/Gather")  # (B, S, H)

    def linear(self, x: str, name: str) -> str:
        """x @ W^T (+ b). The weight is stored transposed, [in, out], for a plain MatMul."""
        b = self.b
        y = b.node("MatMul", [x, b.param(f"{name}.weight", transpose=True)], f"{name}/MatMul")
        if b.has_param(f"{name}.bias"):
            y = b.node("Add", [y, b.param(f"{name}.bias")], f"{name}/Add")
        return y

    def rms_norm(self, x: str, weight: str, eps: float, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, all in float32: squares of fp16 activations overflow.
        This Pow/ReduceMean/Add/Sqrt/Div/Mul chain is the pattern onnxruntime fuses."""
        b = self.b
        x32 = self.to_float(x, name)
        square = b.node("Pow", [x32, b.const(2.0, np.float32)], f"{name}/Pow")
        mean = b.node("ReduceMean", [square, b.const([-1])], f"{name}/ReduceMean", keepdims=1)
        std = b.node("Sqrt", [b.node("Add", [mean, b.const(eps, np.float32)], f"{name}/Add")],
                     f"{name}/Sqrt")
        normed = b.node("Div", [x32, std], f"{name}/Div")
        scaled = b.node("Mul", [normed, b.param(weight, dtype=np.float32)], f"{name}/Mul")
        return self.from_float(scaled, name)

    def rope_tables(self, position_ids: str, inv_freq: np.ndarray, name: str) -> tuple[str, str]:
        """cos and sin of position * inv_freq, (B, 1, S, D), computed in float32 like
        transformers does, then cast to the graph dtype."""
        b = self.b
        pos = b.node("Cast", [position_ids], f"{name}/Cast", to=FLOAT)
        pos = b.node("Unsqueeze", [pos, b.const([-1])], f"{name}/Unsqueeze")  # (B, S, 1)
        freqs = b.node("Mul", [pos, b.const(inv_freq, np.float32)], f"{name}/Mul")  # (B, S, D/2)
        emb = b.node("Concat", [freqs, freqs], f"{name}/Concat", axis=-1)  # (B, S, D)
        emb = b.node("Unsqueeze", [emb, b.const([1])], f"{name}/Unsqueeze_heads")  # (B, 1, S, D)
        cos = self.from_float(b.node("Cos", [emb], f"{name}/Cos"), f"{name}/cos")
        sin = self.from_float(b.node("Sin", [emb], f"{name}/Sin"), f"{name}/sin")
        return cos, sin

    def rotary(self, x: str, cos: str, sin: str, head_dim: int, name: str) -> str:
        """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1)."""
        b = self.b
        half = head_dim // 2
        axes = b.const([-1])
        x1 = b.node("Slice", [x, b.const([0]), b.const([half]), axes], f"{name}/Slice_1")
        x2 = b.node("Slice", [x, b.const([half]), b.const([head_dim]), axes], f"{name}/Slice_2")
        rotated = b.node("Concat", [b.node("Neg", [x2], f"{name}/Neg"), x1], f"{name}/Concat",
                         axis=-1)
        return b.node("Add", [b.node("Mul", [x, cos], f"{name}/Mul_cos"),
                              b.node("Mul", [rotated, sin], f"{name}/Mul_sin")], f"{name}/Add")

    def attention_mask(self, attention_mask: str, input_ids: str, name: str) -> str:
        """Boolean (B, 1, S, T): key j is visible to query i when attention_mask[b, j] is set
        (padding) and j <= past_len + i (causal), with T = past_len + S."""
        b = self.b
        total = b.node("Shape", [attention_mask], f"{name}/Shape_total", start=1, end=2)
        seq = b.node("Shape", [input_ids], f"{name}/Shape_seq", start=1, end=2)
        past = b.node("Sub", [total, seq], f"{name}/Sub")
        scalar = b.const([0])
        total_s = b.node("Squeeze", [total, scalar], f"{name}/Squeeze_total")
        past_s = b.node("Squeeze", [past, scalar], f"{name}/Squeeze_past")
        one = b.const(1)
        keys = b.node("Range", [b.const(0), total_s, one], f"{name}/Range_keys")  # (T,)
        queries = b.node("Range", [past_s, total_s, one], f"{name}/Range_queries")  # (S,)
        causal = b.node("LessOrEqual", [
            b.node("Unsqueeze", [keys, b.const([0])], f"{name}/Unsqueeze_keys"),  # (1, T)
            b.node("Unsqueeze", [queries, b.const([1])], f"{name}/Unsqueeze_queries"),  # (S, 1)
        ], f"{name}/LessOrEqual")  # (S, T)
        padding = b.node("Cast", [attention_mask], f"{name}/Cast", to=TensorProto.BOOL)
        padding = b.node("Unsqueeze", [padding, b.const([1, 2])], f"{name}/Unsqueeze_pad")
        return b.node("And", [padding, causal], f"{name}/And")  # (B, 1, S, T)

    def repeat_kv(self, x: str, groups: int, num_heads: int, head_dim: int, name: str) -> str:
        """GQA: (B, KV, T, D) -> (B, KV * groups, T, D), each kv head repeated `groups` times."""
        if groups == 1:
            return x
        b = self.b
        x = b.node("Unsqueeze", [x, b.const([2])], f"{name}/Unsqueeze")  # (B, KV, 1, T, D)
        x = b.node("Expand", [x, b.const([1, 1, groups, 1, 1])], f"{name}/Expand")
        return b.node("Reshape", [x, b.const([0, num_heads, -1, head_dim])], f"{name}/Reshape")

    def attention(self, q: str, k: str, v: str, mask: str, num_heads: int, num_kv_heads: int,
                  head_dim: int, name: str) -> str:
        """softmax(q k^T / sqrt(D), masked) v over (B, H, S, D) q and (B, KV, T, D) k, v.
        Masked scores take float32's most negative finite value rather than -inf, so a fully
        masked row (a left-pad query) gives a uniform softmax instead of NaN. The softmax runs in
        float32 in every graph."""
        b = self.b
        groups = num_heads // num_kv_heads
        k = self.repeat_kv(k, groups, num_heads, head_dim, f"{name}/repeat_k")
        v = self.repeat_kv(v, groups, num_heads, head_dim, f"{name}/repeat_v")
        k_t = b.node("Transpose", [k], f"{name}/Transpose_k", perm=[0, 1, 3, 2])  # (B, H, D, T)
        scores = self.to_float(b.node("MatMul", [q, k_t], f"{name}/MatMul_qk"), f"{name}/scores")
        scores = b.node("Mul", [scores, b.const(head_dim**-0.5, np.float32)], f"{name}/Mul")
        lowest = b.const(np.finfo(np.float32).min, np.float32)
        scores = b.node("Where", [mask, scores, lowest], f"{name}/Where")  # (B, H, S, T)
        probs = self.from_float(b.node("Softmax", [scores], f"{name}/Softmax", axis=-1),
                                f"{name}/probs")
        return b.node("MatMul", [probs, v], f"{name}/MatMul_v")  # (B, H, S, D)

    def silu(self, x: str, name: str) -> str:
        return self.b.node("Mul", [x, self.b.node("Sigmoid", [x], f"{name}/Sigmoid")],
                           f"{name}/Mul")

    def tied_head(self, x: str, table: str, hidden_size: int, vocab_size: int, batch_seq: str,
                  name: str) -> str:
        """Logits from the embedding table itself: (B*S, H) x (V, H)^T with Gemm(transB=1), so a
        tied weight is stored once. `batch_seq` is (B, S), the shape of the input ids."""
        b = self.b
        flat = b.node("Reshape", [x, b.const([-1, hidden_size])], f"{name}/Reshape_in")
        logits = b.node("Gemm", [flat, table], f"{name}/Gemm", transB=1)  # (B*S, V)
        shape = b.node("Concat", [batch_seq, b.const([vocab_size])], f"{name}/Concat", axis=0)
        return b.node("Reshape", [logits, shape], f"{name}/Reshape_out")  # (B, S, V)
