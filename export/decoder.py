"""The Qwen decoder-only transformer, one small method per block. Names follow the checkpoint
(`model.layers.{i}.self_attn.q_proj` ...) so every initializer maps back to its tensor.

I/O contract of the graph:
  inputs   input_ids (B, S) int64, attention_mask (B, T) int64, position_ids (B, S) int64,
           past_key_values.{i}.key / .value (B, KV, T - S, D), T - S may be 0
  outputs  logits (B, S, V) float32, present.{i}.key / .value (B, KV, T, D) = concat(past, new)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from export.architectures import Architecture, ModelConfig
from export.graph import GraphBuilder
from export.ops import PortableOps

EMBED = "model.embed_tokens.weight"
INT64 = TensorProto.INT64


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies over pairs of the head dim, as transformers computes them."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    return (1.0 / cfg.rope_theta**exponents).astype(np.float32)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    caches = [(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [f"past_key_values.{i}.{kind}" for i, kind in caches]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i, kind in caches]
    return inputs, outputs


@dataclass
class Decoder:
    b: GraphBuilder
    ops: PortableOps
    arch: Architecture
    cfg: ModelConfig

    @property
    def tied(self) -> bool:
        return self.cfg.tie_word_embeddings or not self.b.has_param("lm_head.weight")

    @property
    def kv_type(self) -> int:
        return self.b.onnx_dtype

    def build(self) -> None:
        b, cfg = self.b, self.cfg
        ids = b.input("input_ids", INT64, ["batch", "seq"])
        mask = b.input("attention_mask", INT64, ["batch", "total_seq"])
        positions = b.input("position_ids", INT64, ["batch", "seq"])
        b.output("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])
        batch_seq = b.node("Shape", [ids], "model/Shape_ids")
        rope = self.ops.rope_tables(positions, inv_freq(cfg), "model.rotary_emb")
        visible = self.ops.attention_mask(mask, ids, "model/attention_mask")
        x = self.embedding(ids)
        for i in range(cfg.num_layers):
            x = self.layer(i, x, rope, visible)
        self.head(self.norm(x, "model.norm"), batch_seq)

    def embedding(self, ids: str) -> str:
        return self.ops.embedding(ids, self.b.param(EMBED), "model.embed_tokens")  # (B, S, H)

    def norm(self, x: str, name: str) -> str:
        return self.ops.rms_norm(x, f"{name}.weight", self.cfg.rms_norm_eps, name)

    def layer(self, i: int, x: str, rope: tuple[str, str], visible: str) -> str:
        p = f"model.layers.{i}"
        attn = self.attention(i, self.norm(x, f"{p}.input_layernorm"), rope, visible)
        x = self.b.node("Add", [x, attn], f"{p}/Add_attn")
        mlp = self.mlp(i, self.norm(x, f"{p}.post_attention_layernorm"))
        return self.b.node("Add", [x, mlp], f"{p}/Add_mlp")

    def split_heads(self, x: str, heads: int, name: str) -> str:
        """(B, S, heads * D) -> (B, S, heads, D)."""
        return self.b.node("Reshape", [x, self.b.const([0, 0, heads, self.cfg.head_dim])],
                           f"{name}/Reshape")

    def heads_first(self, x: str, name: str) -> str:
        return self.b.node("Transpose", [x], f"{name}/Transpose", perm=[0, 2, 1, 3])  # (B, H, S, D)

    def qkv(self, p: str, x: str) -> tuple[str, str, str]:
        """Projections split into heads, (B, S, heads, D); q and k normed per head (Qwen3)."""
        cfg, ops = self.cfg, self.ops
        q = self.split_heads(ops.linear(x, f"{p}.q_proj"), cfg.num_heads, f"{p}.q_proj")
        k = self.split_heads(ops.linear(x, f"{p}.k_proj"), cfg.num_kv_heads, f"{p}.k_proj")
        v = self.split_heads(ops.linear(x, f"{p}.v_proj"), cfg.num_kv_heads, f"{p}.v_proj")
        if self.arch.qk_norm:
            q, k = self.norm(q, f"{p}.q_norm"), self.norm(k, f"{p}.k_norm")
        return q, k, v

    def cache(self, i: int, kind: str, new: str) -> str:
        """present = concat(past, new) over the sequence axis; it is also what attention reads."""
        cfg = self.cfg
        past = self.b.input(f"past_key_values.{i}.{kind}", self.kv_type,
                            ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim])
        present = self.b.output(f"present.{i}.{kind}", self.kv_type,
                                ["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim])
        return self.b.node("Concat", [past, new], f"model.layers.{i}.self_attn/{kind}_cache",
                           outputs=[present], axis=2)

    def attention(self, i: int, x: str, rope: tuple[str, str], visible: str) -> str:
        cfg, ops, p = self.cfg, self.ops, f"model.layers.{i}.self_attn"
        q, k, v = (self.heads_first(t, f"{p}/{n}") for t, n in zip(self.qkv(p, x), "qkv",
                                                                      strict=True))
        q = ops.rotary(q, *rope, cfg.head_dim, f"{p}/rotary_q")
        k = self.cache(i, "key", ops.rotary(k, *rope, cfg.head_dim, f"{p}/rotary_k"))
        v = self.cache(i, "value", v)
        out = ops.attention(q, k, v, visible, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            f"{p}/attention")  # (B, H, S, D)
        out = self.b.node("Transpose", [out], f"{p}/Transpose_out", perm=[0, 2, 1, 3])
        out = self.b.node("Reshape", [out, self.b.const([0, 0, cfg.num_heads * cfg.head_dim])],
                          f"{p}/Reshape_out")  # (B, S, H * D)
        return ops.linear(out, f"{p}.o_proj")

    def mlp(self, i: int, x: str) -> str:
        """down(silu(gate(x)) * up(x))."""
        ops, p = self.ops, f"model.layers.{i}.mlp"
        gate = ops.silu(ops.linear(x, f"{p}.gate_proj"), f"{p}/act_fn")
        up = ops.linear(x, f"{p}.up_proj")
        return ops.linear(self.b.node("Mul", [gate, up], f"{p}/Mul"), f"{p}.down_proj")

    def head(self, x: str, batch_seq: str) -> str:
        """lm_head, then float32 logits whatever the graph dtype."""
        cfg = self.cfg
        if self.tied:
            logits = self.ops.tied_head(x, EMBED, cfg.hidden_size, cfg.vocab_size, batch_seq,
                                        "lm_head")
        else:
            logits = self.ops.linear(x, "lm_head")
        return self.b.node("Cast", [logits], "lm_head/Cast", outputs=["logits"],
                           to=TensorProto.FLOAT)
