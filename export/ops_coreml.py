"""The `coreml` target: only standard ONNX ops from the CoreML execution provider's ML Program
list (export/coreml_support.py checks the graph against it), and static shapes where CoreML
needs them: batch 1 and a fixed-size KV window of W slots, slot j holding position j. The chunk
length S stays symbolic (1 while decoding, longer during prefill).

The window is written without scatter ops (the CoreML provider has none): the engine passes a
one-hot slot map U (1, 1, W, S) with U[p + s, s] = 1 for the chunk's positions p .. p + S - 1, and

  present = past * (1 - rowsum(U)) + U @ new           (B, KV, W, D)

which is exact (U is 0/1). Attention reads the whole window with an additive mask from the
engine, attention_bias (1, 1, S, W): 0 where slot j <= p + s, a large negative value elsewhere
(slots not yet written, or past a trimmed offset). Query heads attend in groups of H / KV per kv
head by a reshape, so keys and values are never repeated. Other substitutions: Gather becomes
GatherND, Neg becomes Mul by -1.

I/O (`io_mode` "window"):
  inputs   input_ids (1, S) int64, position_ids (1, S) int64, attention_bias (1, 1, S, W) float32,
           cache_update (1, 1, W, S) graph dtype, logits_index (N,) int64,
           past_key_values.{i}.key / .value (1, KV, W, D)
  outputs  logits (1, N, V) float32, present.{i}.key / .value (1, KV, W, D)
The engine alternates two buffers per cache tensor (past of one step is present of the next).
"""

from __future__ import annotations

import numpy as np

from export.ops import FLOAT, INT64, PortableOps


class CoreMLOps(PortableOps):
    io_mode = "window"
    feeds = ("input_ids", "position_ids", "attention_bias", "cache_update", "logits_index")
    batch = 1

    def __init__(self, b, cfg, window: int):
        super().__init__(b, cfg)
        self.window = min(window, cfg.context_length)

    @property
    def context_length(self) -> int:
        return self.window

    # -- graph I/O -------------------------------------------------------------------------------

    def logits_shape(self) -> list:
        return [1, "logits_seq", self.cfg.vocab_size]

    def prepare(self, ids: str) -> dict:
        b, w = self.b, self.window
        positions = b.input("position_ids", INT64, [1, "seq"])
        bias = b.input("attention_bias", FLOAT, [1, 1, "seq", w])
        update = b.input("cache_update", b.onnx_dtype, [1, 1, w, "seq"])
        index = b.input("logits_index", INT64, ["logits_seq"])
        written = b.node("ReduceSum", [update, b.const([-1])], "model/cache/ReduceSum", keepdims=1)
        keep = b.node("Sub", [b.const(1.0, b.dtype), written], "model/cache/keep")  # (1, 1, W, 1)
        rope = self.rope_tables(positions, "model.rotary_emb")
        return {"rope": rope, "bias": bias, "update": update, "keep": keep, "index": index}

    def select_positions(self, x: str, ctx: dict) -> str:
        b, name = self.b, "model/logits_positions"
        rows = b.node("Reshape", [x, b.const([-1, self.cfg.hidden_size])], f"{name}/Reshape")
        index = b.node("Unsqueeze", [ctx["index"], b.const([-1])], f"{name}/Unsqueeze")  # (N, 1)
        picked = b.node("GatherND", [rows, index], f"{name}/GatherND")  # (N, H)
        return b.node("Unsqueeze", [picked, b.const([0])], f"{name}/Unsqueeze_batch")

    # -- blocks ----------------------------------------------------------------------------------

    def embedding(self, ids: str, table: str, name: str) -> str:
        b = self.b
        index = b.node("Unsqueeze", [ids, b.const([-1])], f"{name}/Unsqueeze")  # (1, S, 1)
        return b.node("GatherND", [b.param(table), index], f"{name}/GatherND")  # (1, S, H)

    def negate(self, x: str, name: str) -> str:
        return self.b.node("Mul", [x, self.b.const(-1.0, self.b.dtype)], f"{name}/Negate")

    def window_write(self, i: int, kind: str, new: str, ctx: dict) -> str:
        """present = past * keep + U @ new over the (1, KV, W, D) window."""
        b, cfg = self.b, self.cfg
        shape = [1, cfg.num_kv_heads, self.window, cfg.head_dim]
        past = b.input(f"past_key_values.{i}.{kind}", b.onnx_dtype, shape)
        present = b.output(f"present.{i}.{kind}", b.onnx_dtype, shape)
        name = f"model.layers.{i}.self_attn/{kind}_cache"
        placed = b.node("MatMul", [ctx["update"], new], f"{name}/MatMul")  # (1, KV, W, D)
        kept = b.node("Mul", [past, ctx["keep"]], f"{name}/Mul")
        return b.node("Add", [kept, placed], name, outputs=[present])

    def grouped_attention(self, q: str, k: str, v: str, bias: str, name: str) -> str:
        """softmax(q k^T / sqrt(D) + bias) v with (1, H, S, D) q and (1, KV, W, D) k, v: the
        H / KV query heads of a kv head are stacked along the sequence axis."""
        b, cfg = self.b, self.cfg
        kv, d, w = cfg.num_kv_heads, cfg.head_dim, self.window
        grouped = b.node("Reshape", [q, b.const([1, kv, -1, d])], f"{name}/Reshape_q")  # G*S rows
        k_t = b.node("Transpose", [k], f"{name}/Transpose_k", perm=[0, 1, 3, 2])  # (1, KV, D, W)
        scores = self.to_float(
            b.node("MatMul", [grouped, k_t], f"{name}/MatMul_qk"), f"{name}/scores"
        )  # (1, KV, G*S, W)
        scores = b.node(
            "Reshape", [scores, b.const([1, cfg.num_heads, -1, w])], f"{name}/Reshape_scores"
        )  # (1, H, S, W)
        scores = b.node("Mul", [scores, b.const(d**-0.5, np.float32)], f"{name}/Mul")
        scores = b.node("Add", [scores, bias], f"{name}/Add_bias")
        probs = self.from_float(
            b.node("Softmax", [scores], f"{name}/Softmax", axis=-1), f"{name}/probs"
        )
        probs = b.node("Reshape", [probs, b.const([1, kv, -1, w])], f"{name}/Reshape_probs")
        out = b.node("MatMul", [probs, v], f"{name}/MatMul_v")  # (1, KV, G*S, D)
        return b.node(
            "Reshape", [out, b.const([1, cfg.num_heads, -1, d])], f"{name}/Reshape_out"
        )  # (1, H, S, D)

    def attend(self, i: int, q: str, k: str, v: str, ctx: dict) -> str:
        cfg, p = self.cfg, f"model.layers.{i}.self_attn"
        q, k, v = self.split_qkv_heads(q, k, v, p)
        q = self.rotary(q, *ctx["rope"], cfg.head_dim, f"{p}/rotary_q")
        k = self.window_write(
            i, "key", self.rotary(k, *ctx["rope"], cfg.head_dim, f"{p}/rotary_k"), ctx
        )
        v = self.window_write(i, "value", v, ctx)
        return self.merge_heads(self.grouped_attention(q, k, v, ctx["bias"], f"{p}/attention"), p)
