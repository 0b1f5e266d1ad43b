"""The `cpu` and `cuda` targets: onnxruntime's fused contrib ops where they pay off.

- RMSNorm is SimplifiedLayerNormalization; a residual add followed by a norm is one
  SkipSimplifiedLayerNormalization (it also outputs the sum, the new residual stream).
- Attention is com.microsoft GroupQueryAttention with RoPE fused (do_rotary, cos/sin caches as
  initializers). Qwen3's per-head q/k RMSNorm runs before it as SimplifiedLayerNormalization
  over the head dim (in float32 graphs one node for q's and k's heads together, then a Mul by
  each head's weight): GQA's own q_norm_weight input is honoured only by the CUDA and WebGPU
  kernels (the CPU kernel rejects a node that sets it), so one graph serves both devices.
- The KV cache is one buffer per layer and kind, (B, KV, capacity, D), bound as both past and
  present (GQA's shared-buffer mode): the kernel writes the new keys and values in place at
  position seqlens_k + 1 - S and reads the first seqlens_k + 1. The engine sizes and grows the
  buffer; nothing is concatenated or copied per step.
- Logits are computed only for the positions in `logits_index` (the last one while generating),
  gathered before the 151936-wide head.
- q/k/v and gate/up are each one matmul over stacked weights, then Split. float32 weights stay
  in the checkpoint's (out, in) layout for FusedMatMul(transB): read at full speed without
  onnxruntime's prepacking, so the session skips it (manifest `session_config`) and the weights
  stay memory-mapped. fp16 graphs use MatMul over (in, out).

I/O (`io_mode` "shared"):
  inputs   input_ids (B, S) int64, seqlens_k (B,) int32 = tokens after this step - 1,
           total_sequence_length () int32 = tokens after this step, logits_index (N,) int64,
           past_key_values.{i}.key / .value (B, KV, capacity, D)
  outputs  logits (B, N, V) float32, present.{i}.key / .value: the same buffers as the past
Batch > 1 needs right-padded rows in one shared buffer; the engine runs batch 1.

GQA kernel limits (checked in onnxruntime 1.32): head_dim % 8 == 0, and % 16 == 0 for the fused
rotary; a head_dim that is a multiple of 8 but not 16 gets RoPE from standard ops before GQA.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from export.architectures import inv_freq, rope_attention_factor
from export.graph import convert
from export.ops import INT64, PortableOps
from fermi.errors import UnsupportedArchitecture

INT32 = TensorProto.INT32
MS = "com.microsoft"


def rope_cache(cfg, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * inv_freq for every position, (context, D/2), times the rope
    type's attention factor, in float32 like transformers, then cast to the graph dtype."""
    freqs = np.arange(cfg.context_length, dtype=np.float32)[:, None] * inv_freq(cfg)[None, :]
    factor = np.float32(rope_attention_factor(cfg))
    return (np.cos(freqs) * factor).astype(dtype), (np.sin(freqs) * factor).astype(dtype)


def stacked_name(names: list[str]) -> str:
    """q_proj+k_proj+v_proj: the checkpoint's first name, then the others' last parts."""
    return "+".join([names[0]] + [n.rsplit(".", 1)[-1] for n in names[1:]])


class FusedOps(PortableOps):
    io_mode = "shared"
    feeds = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")

    def __init__(self, b, cfg):
        super().__init__(b, cfg)
        if cfg.head_dim % 8:
            raise UnsupportedArchitecture(
                f"head_dim {cfg.head_dim} is not a multiple of 8, which onnxruntime's "
                "GroupQueryAttention needs; export with --target portable"
            )
        self.rotary_in_attention = cfg.head_dim % 16 == 0
        self._together: tuple[str, ...] = ()  # projections bias_and_split keeps as one output

    # -- graph I/O -------------------------------------------------------------------------------

    def logits_shape(self) -> list:
        return ["batch", "logits_seq", self.cfg.vocab_size]

    def prepare(self, ids: str) -> dict:
        b = self.b
        ctx = {
            "seqlens_k": b.input("seqlens_k", INT32, ["batch"]),
            "total": b.input("total_sequence_length", INT32, []),
            "index": b.input("logits_index", INT64, ["logits_seq"]),
        }
        if self.rotary_in_attention:
            cos, sin = rope_cache(self.cfg, b.dtype)
            ctx["rope"] = [b.external("rope.cos_cache", cos), b.external("rope.sin_cache", sin)]
        else:
            ctx["rope"] = self.rope_before_attention(ids, ctx["seqlens_k"])
        return ctx

    def rope_before_attention(self, ids: str, seqlens_k: str) -> tuple[str, str]:
        """cos and sin, (B, S, 1, D), at positions seqlens_k + 1 - S ... seqlens_k: where GQA
        itself would have put them, for heads that the fused rotary cannot take."""
        b, name = self.b, "model.rotary_emb"
        seq = b.node("Shape", [ids], f"{name}/Shape_seq", start=1, end=2)  # (1,)
        total = b.node(
            "Cast",
            [b.node("Add", [seqlens_k, b.const([1], np.int32)], f"{name}/Add")],
            f"{name}/Cast_total",
            to=INT64,
        )  # (B,)
        past = b.node("Sub", [total, seq], f"{name}/Sub")  # (B,)
        steps = b.node(
            "Range",
            [b.const(0), b.node("Squeeze", [seq, b.const([0])], f"{name}/Squeeze"), b.const(1)],
            f"{name}/Range",
        )  # (S,)
        positions = b.node(
            "Add",
            [b.node("Unsqueeze", [past, b.const([1])], f"{name}/Unsqueeze"), steps],
            f"{name}/positions",
        )  # (B, S)
        cos, sin = self.rope_tables(positions, name)  # (B, 1, S, D)
        return tuple(
            b.node("Transpose", [t], f"{name}/Transpose_{n}", perm=[0, 2, 1, 3])
            for t, n in ((cos, "cos"), (sin, "sin"))
        )  # (B, S, 1, D)

    def select_positions(self, x: str, ctx: dict) -> str:
        return self.b.node("Gather", [x, ctx["index"]], "model/logits_positions", axis=1)

    @property
    def session_config(self) -> dict[str, str]:
        """float32 weights are stored as the checkpoint has them, (out, in), for FusedMatMul with
        transB: onnxruntime's kernel reads that layout at full speed without repacking, so the
        session skips prepacking (a 2.4 GB copy for Qwen3-0.6B) and the weights stay memory-
        mapped: load takes milliseconds instead of seconds and memory holds one copy."""
        return {"session.disable_prepacking": "1"} if self.b.dtype == np.float32 else {}

    # -- blocks ----------------------------------------------------------------------------------

    def dense(self, x: str, weight: str, w: np.ndarray) -> str:
        """x @ w^T for a weight w (out, in) computed at export time (stacked projections)."""
        b = self.b
        if b.dtype != np.float32:  # fp16 (the cuda target): MatMul over (in, out)
            return b.node(
                "MatMul",
                [x, b.external(weight, convert(w, b.dtype, transpose=True))],
                f"{weight}/MatMul",
            )
        return b.node(
            "FusedMatMul",
            [x, b.external(weight, convert(w, b.dtype))],
            f"{weight}/FusedMatMul",
            domain=MS,
            transB=1,
        )

    def linear(self, x: str, name: str) -> str:
        """x @ W^T (+ b), W kept (out, in) for FusedMatMul with transB (fp32)."""
        return self.projections(x, [name])[0]

    def projections(self, x: str, names: list[str]) -> list[str]:
        """One matmul over the weights stacked along the output axis, then Split: a single
        kernel (one pass of the thread pool) instead of two or three per block."""
        parts = [self.b.checkpoint.tensor(f"{n}.weight") for n in names]  # each (out_i, in)
        stacked = stacked_name(names)
        weight = (
            parts[0]
            if len(parts) == 1
            else np.concatenate([convert(part, np.float32) for part in parts])
        )
        y = self.dense(x, f"{stacked}.weight", weight)
        return self.bias_and_split(y, names, [len(part) for part in parts])

    def bias_and_split(self, y: str, names: list[str], sizes: list[int]) -> list[str]:
        """The stacked projection's output `y` (B, S, sum(sizes)) plus the biases the checkpoint
        has (zeros for the others), split back into one output per name."""
        b, stacked = self.b, stacked_name(names)
        if any(b.has_param(f"{n}.bias") for n in names):
            bias = np.concatenate(
                [
                    b.checkpoint.tensor(f"{n}.bias")
                    if b.has_param(f"{n}.bias")
                    else np.zeros(size, np.float32)
                    for n, size in zip(names, sizes, strict=True)
                ]
            )
            y = b.node(
                "Add", [y, b.external(f"{stacked}.bias", convert(bias, b.dtype))], f"{stacked}/Add"
            )
        groups: list[list[str]] = []  # consecutive names in self._together stay one output
        parts: list[int] = []
        for n, size in zip(names, sizes, strict=True):
            if groups and n in self._together and groups[-1][-1] in self._together:
                groups[-1].append(n)
                parts[-1] += size
            else:
                groups.append([n])
                parts.append(size)
        if len(groups) == 1:
            return [y]
        outputs = [f"{stacked_name(group)}/out" for group in groups]
        b.node("Split", [y, b.const(parts)], f"{stacked}/Split", outputs=outputs, axis=-1)
        return outputs

    def normed_qkv(self, x: str, p: str, eps: float) -> tuple[str, str, str]:
        """Qwen3's q/k norms as one SimplifiedLayerNormalization over q's and k's heads
        together, (B, S, Hq + Hk, D) with unit scale, then one Mul by each head's weight
        ((Hq + Hk) * D, tiled from q_norm and k_norm: onnxruntime folds it into one constant
        when the session loads); q and k
        stay one tensor from their matmul to here. Per layer that is one
        thread-pool dispatch fewer (a norm over several rows runs on the pool) and one or two
        nodes fewer: 1-4% faster decode on the Qwen3-0.6B shape at int4 on a quiet machine
        (docs/benchmarks.md, "Per-step decode cost"). The float32 graph only: in fp16 the Mul
        would round once more than the fused norm."""
        cfg, b = self.cfg, self.b
        if b.dtype != np.float32:
            return super().normed_qkv(x, p, eps)
        names = [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"]
        self._together = tuple(names[:2])
        try:
            outputs = self.projections(x, names)
        finally:
            self._together = ()
        hq, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if len(outputs) == 3:  # q and k from different matmuls (their weights differ in kind)
            q, k, v = outputs
            return (
                self.head_norm(q, hq, f"{p}.q_norm", eps),
                self.head_norm(k, hk, f"{p}.k_norm", eps),
                v,
            )
        qk, v = outputs
        name = f"{p}.qk_norm"
        heads = self.split_heads(qk, hq + hk, f"{name}/split")
        ones = b.node(
            "ConstantOfShape",
            [b.const([d])],
            f"{name}/unit_scale",
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        )  # (D,): a scale of 1 held by the node, not stored as a weight; folded at load
        normed = b.node(
            "SimplifiedLayerNormalization",
            [heads, ones],
            f"{name}/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )
        weight = b.node(
            "Concat",
            [
                b.node(
                    "Tile",
                    [b.param(f"{p}.{n}.weight", np.float32), b.const([h])],
                    f"{name}/Tile_{n}",
                )
                for n, h in (("q_norm", hq), ("k_norm", hk))
            ],
            f"{name}/Concat_weight",
            axis=0,
        )  # ((Hq + Hk) * D,) from the checkpoint's two (D,) weights: constant, folded at load
        flat = self.flatten_heads(normed, hq + hk, f"{name}/flat")
        scaled = b.node("Mul", [flat, weight], f"{name}/Mul")
        q, k = f"{p}.q_norm/out", f"{p}.k_norm/out"
        sizes = b.const([hq * d, hk * d])
        b.node("Split", [scaled, sizes], f"{name}/Split", outputs=[q, k], axis=-1)
        return q, k, v

    def tied_head(self, x: str, table: str, name: str) -> str:
        if self.b.dtype != np.float32:
            return super().tied_head(x, table, name)
        return self.b.node(
            "FusedMatMul", [x, table], f"{name}/FusedMatMul", domain=MS, transB=1
        )  # (B, N, V)

    def rms_norm(self, x: str, weight: str, eps: float, name: str) -> str:
        """Over the last axis; the kernel accumulates in float32 (stash_type 1) for fp16 too."""
        b = self.b
        return b.node(
            "SimplifiedLayerNormalization",
            [x, b.param(weight)],
            f"{name}/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )

    def add_norm(
        self, x: str, residual: str | None, weight: str, eps: float, name: str
    ) -> tuple[str, str]:
        if residual is None:
            return self.rms_norm(x, weight, eps, name), x
        b = self.b
        node = f"{name}/SkipSimplifiedLayerNormalization"
        normed, total = f"{node}/out", f"{node}/input_skip_sum"
        b.node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, b.param(weight)],
            node,
            outputs=[normed, "", "", total],
            domain=MS,
            epsilon=eps,
        )
        return normed, total

    def rotate_flat(self, x: str, heads: int, ctx: dict, name: str) -> str:
        """RoPE from standard ops, for a head_dim that the fused rotary cannot take;
        (B, S, heads * D) in and out."""
        split = self.split_heads(x, heads, name)
        rotated = self.rotary(split, *ctx["rope"], self.cfg.head_dim, f"{name}/rotary")
        return self.flatten_heads(rotated, heads, f"{name}/flat")

    def attend(self, i: int, q: str, k: str, v: str, ctx: dict) -> str:
        """q, k, v flat, (B, S, heads * D): the layout GroupQueryAttention takes."""
        b, cfg, p = self.b, self.cfg, f"model.layers.{i}.self_attn"
        if not self.rotary_in_attention:
            q = self.rotate_flat(q, cfg.num_heads, ctx, f"{p}/q")
            k = self.rotate_flat(k, cfg.num_kv_heads, ctx, f"{p}/k")
        cache_shape = ["batch", cfg.num_kv_heads, "capacity", cfg.head_dim]
        past = [
            b.input(f"past_key_values.{i}.{kind}", b.onnx_dtype, cache_shape)
            for kind in ("key", "value")
        ]
        present = [
            b.output(f"present.{i}.{kind}", b.onnx_dtype, cache_shape) for kind in ("key", "value")
        ]
        rope = ctx["rope"] if self.rotary_in_attention else []  # cos_cache, sin_cache
        out = f"{p}/GroupQueryAttention/out"
        b.node(
            "GroupQueryAttention",
            [q, k, v, *past, ctx["seqlens_k"], ctx["total"], *rope],
            f"{p}/GroupQueryAttention",
            outputs=[out, *present],
            domain=MS,
            num_heads=cfg.num_heads,
            kv_num_heads=cfg.num_kv_heads,
            do_rotary=int(self.rotary_in_attention),
            scale=cfg.head_dim**-0.5,
        )
        return out  # (B, S, H * D)
