"""Which nodes of a graph onnxruntime's CoreML execution provider would take, by static
analysis: we cannot run CoreML here (it ships in onnxruntime's macOS wheels only), so this
reads the graph and applies the provider's published rules instead of asking the provider.

    python -m export.coreml_support ARTIFACT

The rules are the ML Program op list of onnxruntime's CoreML provider
(tools/ci_build/github/apple/coreml_supported_mlprogram_ops.md, microsoft/onnxruntime, read at
commit 04f568d8) with the per-op conditions it states that a graph can show statically
(constant Slice bounds, constant Gemm B, float32 Pow, GatherND batch_dims 0, constant Split
sizes). Not modelled: conditions that depend on the macOS version or on runtime shapes, and the
provider's int64 -> int32 handling, and onnxruntime's own rewrites (its basic optimizations,
which run before partitioning, leave these graphs' fp32 op counts unchanged; run on a CPU-only
session they also insert fp16 Casts that a CoreML session would not). Newer onnxruntime releases
add ops (Gather, Where, And ...), so for them the count is a lower bound.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

MLPROGRAM_OPS = frozenset(
    {
        "Add",
        "ArgMax",
        "AveragePool",
        "Cast",
        "Ceil",
        "Clip",
        "Concat",
        "Conv",
        "ConvTranspose",
        "Cos",
        "DepthToSpace",
        "Div",
        "Elu",
        "Erf",
        "Exp",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GridSample",
        "GroupNormalization",
        "HardSigmoid",
        "Identity",
        "InstanceNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "MatMul",
        "Max",
        "MaxPool",
        "Mul",
        "Pow",
        "PRelu",
        "Range",
        "Reciprocal",
        "ReduceMax",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Round",
        "Shape",
        "Sigmoid",
        "Sin",
        "Slice",
        "Softmax",
        "Softplus",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Tile",
        "Transpose",
        "Unsqueeze",
    }
)
# Contrib ops the list names: produced by onnxruntime's own fusions.
MLPROGRAM_CONTRIB_OPS = frozenset({"QuickGelu", "FusedConv"})
STATIC_NOTE = (
    "static analysis of the graph against the CoreML provider's published op list; "
    "not a run of the provider"
)


@dataclass
class Partition:
    coreml: int = 0
    cpu: int = 0
    unsupported: Counter = field(default_factory=Counter)  # "op: reason" -> nodes
    coreml_ops: Counter = field(default_factory=Counter)
    partitions: int = 0  # connected runs of CoreML nodes (each one is a CoreML model)
    dynamic_inputs: dict = field(default_factory=dict)  # graph input -> its symbolic dims

    @property
    def total(self) -> int:
        return self.coreml + self.cpu

    def summary(self) -> str:
        lines = [
            f"CoreML {self.coreml} / {self.total} nodes, CPU {self.cpu}, "
            f"{self.partitions} CoreML partition(s) ({STATIC_NOTE})"
        ]
        lines += [f"  on CPU: {reason} x{n}" for reason, n in self.unsupported.most_common()]
        lines += [f"  dynamic input {name}: {dims}" for name, dims in self.dynamic_inputs.items()]
        return "\n".join(lines)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def unsupported_reason(node: onnx.NodeProto, constants: set[str], types: dict[str, int]) -> str:
    """Why the provider would leave this node to the CPU, or "" when it would take it."""
    if node.domain not in ("", "ai.onnx"):
        return (
            ""
            if node.domain == "com.microsoft" and node.op_type in MLPROGRAM_CONTRIB_OPS
            else f"{node.domain} op"
        )
    if node.op_type not in MLPROGRAM_OPS:
        return "not in the ML Program op list"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Slice" and not all(n in constants for n in node.input[1:] if n):
        return "starts/ends/axes/steps must be constant"
    if node.op_type == "Gemm" and node.input[1] not in constants:
        return "input B must be constant"
    if node.op_type == "Pow" and any(types.get(n) != TensorProto.FLOAT for n in node.input):
        return "both inputs must be float32"
    if node.op_type == "GatherND" and attrs.get("batch_dims", 0) != 0:
        return "batch_dims must be 0"
    if node.op_type == "Split" and len(node.input) > 1 and node.input[1] not in constants:
        return "split sizes must be constant"
    return ""


def partition(model: onnx.ModelProto) -> Partition:
    g = model.graph
    constants = {t.name for t in g.initializer}
    constants |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    types = _elem_types(model)
    result = Partition()
    # Partition estimate: a CoreML node must start a new CoreML model when one of its inputs
    # comes through a CPU node that itself depends on CoreML output (merging would make a
    # cycle). depth = how many such CPU detours lie before a node; one model per depth.
    depth: dict[str, int] = {}  # tensor -> depth of the node that produced it
    via_coreml: dict[str, bool] = {}  # tensor -> depends on some CoreML node's output
    from_cpu: set[str] = set()  # tensors produced by CPU nodes
    depths = set()
    for node in g.node:  # nodes are in topological order
        inputs = [t for t in node.input if t]
        reason = unsupported_reason(node, constants, types)
        if reason:
            result.cpu += 1
            result.unsupported[f"{node.op_type}: {reason}"] += 1
            d = max((depth.get(t, 0) for t in inputs), default=0)
            dep = any(via_coreml.get(t, False) for t in inputs)
            from_cpu.update(node.output)
        else:
            result.coreml += 1
            result.coreml_ops[node.op_type] += 1
            d = max(
                (depth.get(t, 0) + (t in from_cpu and via_coreml.get(t, False)) for t in inputs),
                default=0,
            )
            dep = True
            depths.add(d)
        for t in node.output:
            depth[t], via_coreml[t] = d, dep
    result.partitions = len(depths)
    for value in g.input:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        if dims:
            result.dynamic_inputs[value.name] = dims
    return result


def check_artifact(artifact: Path) -> Partition:
    from fermi.artifact import MODEL_FILE

    return partition(onnx.load(str(Path(artifact) / MODEL_FILE), load_external_data=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m export.coreml_support", description=__doc__.split("\n")[0]
    )
    parser.add_argument("artifact", type=Path)
    args = parser.parse_args(argv)
    print(check_artifact(args.artifact).summary())


if __name__ == "__main__":
    main()
