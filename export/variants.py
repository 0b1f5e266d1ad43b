"""Graph variants: a target (which execution provider the graph is shaped for) and a precision
(float dtype, or block-quantized weights) pick the ops object that builds the graph. The decoder
is the same for all of them; see export/ops.py for the seam.

  portable  standard opset-18 ops, KV concatenated per step (any provider)
  cpu, cuda onnxruntime contrib ops: fused norms, GroupQueryAttention on one shared KV buffer per
            layer, logits only where asked; int4/int8 weights as MatMulNBits
  coreml    standard ops the CoreML provider supports, a fixed-size KV window, static shapes
            except the chunk length
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from export.architectures import ModelConfig
from export.graph import GraphBuilder
from export.ops import PortableOps
from fermi.errors import InvalidRequest

TARGETS = ("portable", "cpu", "cuda", "coreml")
FLOATS = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
QUANTIZED = {"int8": 8, "int4": 4}
PRECISIONS = (*FLOATS, *QUANTIZED)
HEADS = ("fp32", "int8", "int4")  # the precision of lm_head (and of a tied embedding table)
INT4_SCHEMES = ("gptq", "mix", "asym", "plain")  # how int4 weights are chosen (export/quantize.py)


@dataclass(frozen=True)
class GraphOptions:
    """Knobs of the non-portable variants; each is recorded in the manifest where it applies."""

    block_size: int = 32  # quantization block along K: a power of two >= 16
    # MatMulNBits accuracy_level: 4 lets the kernel quantize activations to int8 per block and use
    # integer dot products; 0/1 dequantize the weights to float32 instead (slower, closer).
    accuracy_level: int = 4
    # lm_head (and a tied embedding table) in a quantized graph; see docs/benchmarks.md for why
    head: str = "int8"
    # int4 weights (mix by default): gptq (mix's choices, with AWQ scales and GPTQ rounding
    # from a calibration text, for safetensors checkpoints), mix (zero points, error-minimising
    # scales, the most sensitive matmuls at int8), asym (the same without int8), plain
    # (symmetric, llama.cpp's Q4_0 rule); see export/quantize.py, export/calibrate.py and
    # docs/benchmarks.md
    int4: str = "mix"
    window: int = 4096  # coreml: KV window, which is also that artifact's context length


def resolve_target(target: str) -> str:
    """`auto` is the device this machine would run on (fermi.engine.pick_device)."""
    if target == "auto":
        from fermi.engine import pick_device

        return pick_device("auto")
    if target not in TARGETS:
        raise InvalidRequest(
            f"target must be auto or one of {', '.join(TARGETS)}, not {target!r}", param="target"
        )
    return target


def compute_dtype(precision: str, target: str) -> np.dtype:
    """Activations and KV cache: the float precision itself, or for quantized weights float32
    on CPU and float16 on CUDA (what each device's kernels are fast at)."""
    if precision in FLOATS:
        return FLOATS[precision]
    return FLOATS["fp16" if target == "cuda" else "fp32"]


def check(precision: str, target: str, options: GraphOptions) -> None:
    if precision not in PRECISIONS:
        raise InvalidRequest(
            f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}",
            param="precision",
        )
    if precision in QUANTIZED:
        if target not in ("cpu", "cuda"):
            raise InvalidRequest(
                f"{precision} weights use onnxruntime's MatMulNBits: export them "
                "with --target cpu or cuda",
                param="precision",
            )
        size = options.block_size
        if size < 16 or size & (size - 1):
            raise InvalidRequest(
                f"block size must be a power of two >= 16, not {size}", param="block_size"
            )
        if options.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidRequest("accuracy level must be 0 to 4", param="accuracy_level")
        if options.head not in HEADS:
            raise InvalidRequest(f"head must be one of {', '.join(HEADS)}", param="head")
        if options.int4 not in INT4_SCHEMES:
            raise InvalidRequest(
                f"int4 scheme must be one of {', '.join(INT4_SCHEMES)}, not {options.int4!r}",
                param="int4",
            )
    if target == "coreml" and options.window < 1:
        raise InvalidRequest("the KV window must hold at least one token", param="window")


def make_ops(
    b: GraphBuilder, cfg: ModelConfig, precision: str, target: str, options: GraphOptions
) -> PortableOps:
    if target == "coreml":
        from export.ops_coreml import CoreMLOps

        return CoreMLOps(b, cfg, options.window)
    if target == "portable":
        return PortableOps(b, cfg)
    if precision in QUANTIZED:
        from export.quantize import QuantizedOps

        return QuantizedOps(b, cfg, QUANTIZED[precision], options)
    from export.ops_fused import FusedOps

    return FusedOps(b, cfg)


def recorded_options(precision: str, target: str, options: GraphOptions) -> dict:
    """The options that shaped this graph, for the manifest (and for reusing an artifact)."""
    if precision in QUANTIZED:
        quantized = asdict(options)
        quantized.pop("window")
        if precision != "int4":
            quantized.pop("int4")
        return quantized
    if target == "coreml":
        return {"window": options.window}
    return {}
