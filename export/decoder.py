"""The Qwen decoder-only transformer, one small method per block. Names follow the checkpoint
(`model.layers.{i}.self_attn.q_proj` ...) so every initializer maps back to its tensor.

The graph's I/O besides input_ids and logits (positions, mask, KV cache layout, which positions
get logits) belongs to the target's ops object: see export/ops.py for the portable contract,
export/ops_fused.py and export/ops_coreml.py for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from export.architectures import Architecture, ModelConfig
from export.graph import GraphBuilder
from export.ops import PortableOps

EMBED = "model.embed_tokens.weight"
INT64 = TensorProto.INT64


@dataclass
class Decoder:
    b: GraphBuilder
    ops: PortableOps
    arch: Architecture
    cfg: ModelConfig

    @property
    def tied(self) -> bool:
        return self.cfg.tie_word_embeddings or not self.b.has_param("lm_head.weight")

    def build(self) -> None:
        b, cfg = self.b, self.cfg
        ids = b.input("input_ids", INT64, [self.ops.batch, "seq"])
        ctx = self.ops.prepare(ids)
        b.output("logits", TensorProto.FLOAT, self.ops.logits_shape())
        x, pending = self.embedding(ids), None
        for i in range(cfg.num_layers):
            x, pending = self.layer(i, x, pending, ctx)
        normed, _ = self.add_norm(x, pending, "model.norm")
        self.head(self.ops.select_positions(normed, ctx))

    def embedding(self, ids: str) -> str:
        return self.ops.embedding(ids, EMBED, "model.embed_tokens")  # (B, S, H)

    def norm(self, x: str, name: str) -> str:
        return self.ops.rms_norm(x, f"{name}.weight", self.cfg.rms_norm_eps, name)

    def add_norm(self, x: str, pending: str | None, name: str) -> tuple[str, str]:
        return self.ops.add_norm(x, pending, f"{name}.weight", self.cfg.rms_norm_eps, name)

    def layer(self, i: int, x: str, pending: str | None, ctx: dict) -> tuple[str, str]:
        """One block on the residual stream `x`. `pending` is the previous block's MLP output,
        not yet added to `x`: the add is done together with this block's first norm (a fused
        target does both in one op). Returns the stream and this block's pending MLP output."""
        p = f"model.layers.{i}"
        normed, x = self.add_norm(x, pending, f"{p}.input_layernorm")
        attn = self.attention(i, normed, ctx)
        normed, x = self.add_norm(x, attn, f"{p}.post_attention_layernorm")
        return x, self.mlp(i, normed)

    def qkv(self, p: str, x: str) -> tuple[str, str, str]:
        """The projections, (B, S, heads * D); q and k normed per head (Qwen3), as the target
        builds that best (ops.normed_qkv). Heads are split by the target's attention:
        GroupQueryAttention takes them flat."""
        if self.arch.qk_norm:
            return self.ops.normed_qkv(x, p, self.cfg.rms_norm_eps)
        q, k, v = self.ops.projections(x, [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"])
        return q, k, v

    def attention(self, i: int, x: str, ctx: dict) -> str:
        p = f"model.layers.{i}.self_attn"
        out = self.ops.attend(i, *self.qkv(p, x), ctx)  # (B, S, H * D)
        return self.ops.linear(out, f"{p}.o_proj")

    def mlp(self, i: int, x: str) -> str:
        """down(silu(gate(x)) * up(x))."""
        ops, p = self.ops, f"model.layers.{i}.mlp"
        gate, up = ops.projections(x, [f"{p}.gate_proj", f"{p}.up_proj"])
        gate = ops.silu(gate, f"{p}/act_fn")
        return ops.linear(self.b.node("Mul", [gate, up], f"{p}/Mul"), f"{p}.down_proj")

    def head(self, x: str) -> str:
        """lm_head, then float32 logits whatever the graph dtype."""
        if self.tied:
            logits = self.ops.tied_head(x, EMBED, "lm_head")
        else:
            logits = self.ops.linear(x, "lm_head")
        return self.b.node(
            "Cast", [logits], "lm_head/Cast", outputs=["logits"], to=TensorProto.FLOAT
        )
