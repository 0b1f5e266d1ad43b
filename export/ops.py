"""Op choices for one graph target. The decoder blocks say *what* to compute; an ops object says
*with which ONNX ops*, and owns the graph inputs that come with that choice (how the KV cache is
passed, how positions and the causal mask arrive, which positions get logits).

`PortableOps` uses standard opset-18 ops only, so CPU, CUDA and CoreML execution providers can
all run it. Each other target subclasses it in its own module and overrides the few methods that
change: `ops_fused.FusedOps` (onnxruntime contrib ops, one shared KV buffer per layer),
`quantize.QuantizedOps` (MatMulNBits weights), `ops_coreml.CoreMLOps` (a fixed KV window).

I/O of the portable graph (`io_mode` "concat"):
  inputs   input_ids (B, S) int64, attention_mask (B, T) int64, position_ids (B, S) int64,
           past_key_values.{i}.key / .value (B, KV, T - S, D), T - S may be 0
  outputs  logits (B, S, V) float32, present.{i}.key / .value (B, KV, T, D) = concat(past, new)
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from export.architectures import ModelConfig, inv_freq, rope_attention_factor
from export.graph import GraphBuilder

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class PortableOps:
    io_mode = "concat"  # recorded in the manifest: how the engine feeds this graph
    batch: str | int = "batch"  # the batch dim of input_ids
    feeds = ("input_ids", "attention_mask", "position_ids")  # inputs besides the KV cache

    def __init__(self, b: GraphBuilder, cfg: ModelConfig):
        self.b = b
        self.cfg = cfg

    # -- graph I/O -------------------------------------------------------------------------------

    def cache_names(self, prefix: str) -> list[str]:
        return [
            f"{prefix}.{i}.{kind}" for i in range(self.cfg.num_layers) for kind in ("key", "value")
        ]

    def io_names(self) -> tuple[list[str], list[str]]:
        """Graph inputs and outputs in order, for the manifest."""
        inputs = [*self.feeds, *self.cache_names("past_key_values")]
        return inputs, ["logits", *self.cache_names("present")]

    @property
    def context_length(self) -> int:
        """The longest sequence the graph serves (the manifest's context_length)."""
        return self.cfg.context_length

    @property
    def session_config(self) -> dict[str, str]:
        """onnxruntime session config entries this graph runs best with (in the manifest)."""
        return {}

    def logits_shape(self) -> list:
        return ["batch", "seq", self.cfg.vocab_size]

    def prepare(self, ids: str) -> dict:
        """Declare this target's inputs besides input_ids; return what the layers share (RoPE
        tables, the mask) by name."""
        b = self.b
        mask = b.input("attention_mask", INT64, ["batch", "total_seq"])
        positions = b.input("position_ids", INT64, ["batch", "seq"])
        return {
            "rope": self.rope_tables(positions, "model.rotary_emb"),
            "visible": self.attention_mask(mask, ids, "model/attention_mask"),
        }

    def select_positions(self, x: str, ctx: dict) -> str:
        """The hidden states that get logits: every position in the portable graph."""
        return x

    # -- blocks ----------------------------------------------------------------------------------

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
        return self.b.node("Gather", [self.b.param(table), ids], f"{name}/Gather")  # (B, S, H)

    def linear(self, x: str, name: str) -> str:
        """x @ W^T (+ b). The weight is stored transposed, [in, out], for a plain MatMul."""
        b = self.b
        y = b.node("MatMul", [x, b.param(f"{name}.weight", transpose=True)], f"{name}/MatMul")
        if b.has_param(f"{name}.bias"):
            y = b.node("Add", [y, b.param(f"{name}.bias")], f"{name}/Add")
        return y

    def projections(self, x: str, names: list[str]) -> list[str]:
        """Several linears of the same input (q/k/v, gate/up): one MatMul each here; a fused
        target stacks them into one."""
        return [self.linear(x, name) for name in names]

    def normed_qkv(self, x: str, p: str, eps: float) -> tuple[str, str, str]:
        """Qwen3's attention inputs: the q/k/v projections of x (`p` the layer's self_attn
        prefix), q and k RMS-normed over each head's D values (q_norm, k_norm); each
        (B, S, heads * D)."""
        q, k, v = self.projections(x, [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"])
        q = self.head_norm(q, self.cfg.num_heads, f"{p}.q_norm", eps)
        k = self.head_norm(k, self.cfg.num_kv_heads, f"{p}.k_norm", eps)
        return q, k, v

    def head_norm(self, x: str, heads: int, name: str, eps: float) -> str:
        """RMSNorm over each head's D values with the checkpoint's `name`.weight (D,);
        (B, S, heads * D) in and out."""
        split = self.split_heads(x, heads, f"{name}/split")
        normed = self.rms_norm(split, f"{name}.weight", eps, name)
        return self.flatten_heads(normed, heads, f"{name}/flat")

    def rms_norm(self, x: str, weight: str, eps: float, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, all in float32: squares of fp16 activations overflow.
        This Pow/ReduceMean/Add/Sqrt/Div/Mul chain is the pattern onnxruntime fuses."""
        b = self.b
        x32 = self.to_float(x, name)
        square = b.node("Pow", [x32, b.const(2.0, np.float32)], f"{name}/Pow")
        mean = b.node("ReduceMean", [square, b.const([-1])], f"{name}/ReduceMean", keepdims=1)
        std = b.node(
            "Sqrt", [b.node("Add", [mean, b.const(eps, np.float32)], f"{name}/Add")], f"{name}/Sqrt"
        )
        normed = b.node("Div", [x32, std], f"{name}/Div")
        scaled = b.node("Mul", [normed, b.param(weight, dtype=np.float32)], f"{name}/Mul")
        return self.from_float(scaled, name)

    def add_norm(
        self, x: str, residual: str | None, weight: str, eps: float, name: str
    ) -> tuple[str, str]:
        """(rms_norm(x + residual), x + residual): a block's output joins the residual stream
        and the next block's norm reads it. `residual` None: nothing to add (the first layer)."""
        if residual is not None:
            x = self.b.node("Add", [x, residual], f"{name}/Add_residual")
        return self.rms_norm(x, weight, eps, name), x

    def rope_tables(self, position_ids: str, name: str) -> tuple[str, str]:
        """cos and sin of position * inv_freq, (B, 1, S, D), times the rope type's attention
        factor (YaRN's; 1 otherwise), computed in float32 like transformers does, then cast to
        the graph dtype."""
        b = self.b
        pos = b.node("Cast", [position_ids], f"{name}/Cast", to=FLOAT)
        pos = b.node("Unsqueeze", [pos, b.const([-1])], f"{name}/Unsqueeze")  # (B, S, 1)
        freqs = b.node(
            "Mul", [pos, b.const(inv_freq(self.cfg), np.float32)], f"{name}/Mul"
        )  # (B, S, D/2)
        emb = b.node("Concat", [freqs, freqs], f"{name}/Concat", axis=-1)  # (B, S, D)
        emb = b.node("Unsqueeze", [emb, b.const([1])], f"{name}/Unsqueeze_heads")  # (B, 1, S, D)
        cos, sin = b.node("Cos", [emb], f"{name}/Cos"), b.node("Sin", [emb], f"{name}/Sin")
        factor = rope_attention_factor(self.cfg)
        if factor != 1.0:
            scale = b.const(factor, np.float32)
            cos = b.node("Mul", [cos, scale], f"{name}/Mul_cos_scale")
            sin = b.node("Mul", [sin, scale], f"{name}/Mul_sin_scale")
        return self.from_float(cos, f"{name}/cos"), self.from_float(sin, f"{name}/sin")

    def negate(self, x: str, name: str) -> str:
        return self.b.node("Neg", [x], f"{name}/Neg")

    def rotary(self, x: str, cos: str, sin: str, head_dim: int, name: str) -> str:
        """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1)."""
        b = self.b
        half = head_dim // 2
        axes = b.const([-1])
        x1 = b.node("Slice", [x, b.const([0]), b.const([half]), axes], f"{name}/Slice_1")
        x2 = b.node("Slice", [x, b.const([half]), b.const([head_dim]), axes], f"{name}/Slice_2")
        rotated = b.node("Concat", [self.negate(x2, name), x1], f"{name}/Concat", axis=-1)
        return b.node(
            "Add",
            [
                b.node("Mul", [x, cos], f"{name}/Mul_cos"),
                b.node("Mul", [rotated, sin], f"{name}/Mul_sin"),
            ],
            f"{name}/Add",
        )

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
        causal = b.node(
            "LessOrEqual",
            [
                b.node("Unsqueeze", [keys, b.const([0])], f"{name}/Unsqueeze_keys"),  # (1, T)
                b.node("Unsqueeze", [queries, b.const([1])], f"{name}/Unsqueeze_queries"),  # (S, 1)
            ],
            f"{name}/LessOrEqual",
        )  # (S, T)
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

    def attention(
        self,
        q: str,
        k: str,
        v: str,
        mask: str,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        name: str,
    ) -> str:
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
        probs = self.from_float(
            b.node("Softmax", [scores], f"{name}/Softmax", axis=-1), f"{name}/probs"
        )
        return b.node("MatMul", [probs, v], f"{name}/MatMul_v")  # (B, H, S, D)

    def split_heads(self, x: str, heads: int, name: str) -> str:
        """(B, S, heads * D) -> (B, S, heads, D)."""
        shape = self.b.const([0, 0, heads, self.cfg.head_dim])
        return self.b.node("Reshape", [x, shape], f"{name}/Reshape")

    def flatten_heads(self, x: str, heads: int, name: str) -> str:
        """(B, S, heads, D) -> (B, S, heads * D)."""
        shape = self.b.const([0, 0, heads * self.cfg.head_dim])
        return self.b.node("Reshape", [x, shape], f"{name}/Reshape")

    def heads_first(self, x: str, heads: int, name: str) -> str:
        """(B, S, heads * D) -> (B, heads, S, D)."""
        x = self.split_heads(x, heads, name)
        return self.b.node("Transpose", [x], f"{name}/Transpose", perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, name: str) -> str:
        """(B, H, S, D) -> (B, S, H * D)."""
        x = self.b.node("Transpose", [x], f"{name}/Transpose_out", perm=[0, 2, 1, 3])
        return self.flatten_heads(x, self.cfg.num_heads, f"{name}/out")

    def split_qkv_heads(self, q: str, k: str, v: str, p: str) -> tuple[str, str, str]:
        """Flat q, k, v -> (B, heads, S, D) each."""
        cfg = self.cfg
        return (
            self.heads_first(q, cfg.num_heads, f"{p}/q"),
            self.heads_first(k, cfg.num_kv_heads, f"{p}/k"),
            self.heads_first(v, cfg.num_kv_heads, f"{p}/v"),
        )

    def cache(self, i: int, kind: str, new: str) -> str:
        """present = concat(past, new) over the sequence axis; it is also what attention reads."""
        cfg, b = self.cfg, self.b
        past = b.input(
            f"past_key_values.{i}.{kind}",
            b.onnx_dtype,
            ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim],
        )
        present = b.output(
            f"present.{i}.{kind}",
            b.onnx_dtype,
            ["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim],
        )
        return b.node(
            "Concat",
            [past, new],
            f"model.layers.{i}.self_attn/{kind}_cache",
            outputs=[present],
            axis=2,
        )

    def attend(self, i: int, q: str, k: str, v: str, ctx: dict) -> str:
        """Self-attention of layer i over (B, S, heads * D) q, k, v (q and k not yet rotated),
        with the KV cache; returns (B, S, H * D) for o_proj."""
        cfg, p = self.cfg, f"model.layers.{i}.self_attn"
        q, k, v = self.split_qkv_heads(q, k, v, p)
        q = self.rotary(q, *ctx["rope"], cfg.head_dim, f"{p}/rotary_q")
        k = self.cache(i, "key", self.rotary(k, *ctx["rope"], cfg.head_dim, f"{p}/rotary_k"))
        v = self.cache(i, "value", v)
        out = self.attention(
            q, k, v, ctx["visible"], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, f"{p}/attention"
        )  # (B, H, S, D)
        return self.merge_heads(out, p)

    def silu(self, x: str, name: str) -> str:
        return self.b.node(
            "Mul", [x, self.b.node("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul"
        )

    def tied_head(self, x: str, table: str, name: str) -> str:
        """Logits from the embedding table itself: (B*N, H) x (V, H)^T with Gemm(transB=1), so a
        tied weight is stored once."""
        b, cfg = self.b, self.cfg
        batch_seq = b.node("Shape", [x], f"{name}/Shape", end=2)  # (B, N)
        flat = b.node("Reshape", [x, b.const([-1, cfg.hidden_size])], f"{name}/Reshape_in")
        logits = b.node("Gemm", [flat, table], f"{name}/Gemm", transB=1)  # (B*N, V)
        shape = b.node("Concat", [batch_seq, b.const([cfg.vocab_size])], f"{name}/Concat", axis=0)
        return b.node("Reshape", [logits, shape], f"{name}/Reshape_out")  # (B, N, V)
