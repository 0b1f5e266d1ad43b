"""Qwen3's q/k norms in the cpu graph: one SimplifiedLayerNormalization over q's and k's heads
together (export/ops_fused.py, FusedOps.normed_qkv), the same numbers as one norm each."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import ops_fused
from export.exporter import export_model
from export.ops import PortableOps
from fermi.artifact import load_manifest
from fermi.engine import Engine

IDS = [3, 17, 42, 99, 7, 250, 31, 64]


def ops_of(artifact, tmp_path) -> Counter:
    """Op types of the graph a session runs: onnxruntime's optimized graph (constants folded,
    its own fusions applied), saved beside the test's other files."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{artifact.name}.optimized.onnx")
    ort.InferenceSession(str(artifact / "model.onnx"), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def all_logits(artifact) -> np.ndarray:
    engine = Engine(artifact, "cpu", threads=1)
    return engine.forward(IDS, engine.new_cache(), last_only=False)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """tiny-qwen3 (norm weights drawn around 1, not all ones) at fp32 and int4, cpu target,
    with the merged q/k norm and, for reference, with one norm each (the default ops)."""
    root = tmp_path_factory.mktemp("qknorm")
    out = {}
    for precision in ("fp32", "int4"):
        out[precision] = export_model("tiny-qwen3", precision, root / precision, target="cpu")
    merged = ops_fused.FusedOps.normed_qkv
    ops_fused.FusedOps.normed_qkv = PortableOps.normed_qkv
    try:
        for precision in ("fp32", "int4"):
            out[f"{precision}-separate"] = export_model(
                "tiny-qwen3", precision, root / f"{precision}-separate", target="cpu"
            )
    finally:
        ops_fused.FusedOps.normed_qkv = merged
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_one_norm_per_layer_for_q_and_k(exports, precision, tmp_path):
    layers = load_manifest(exports[precision]).num_layers
    merged = ops_of(exports[precision], tmp_path)
    separate = ops_of(exports[f"{precision}-separate"], tmp_path)
    folded = ("Tile", "Concat", "ConstantOfShape")  # the scales, constants at load
    assert not any(op in merged for op in folded)
    # q/k norms plus the first layer's input norm (the others are SkipSimplified...)
    assert merged["SimplifiedLayerNormalization"] == layers + 1
    assert separate["SimplifiedLayerNormalization"] == 2 * layers + 1
    # q+k+v in one matmul (fp32): Split(q+k, v) + 5 nodes instead of Split(q, k, v) + 6; the
    # int4 mix keeps v at int8 in its own matmul: 5 nodes instead of Split(q, k) + 6
    saved = {"fp32": 1, "int4": 2}[precision]
    assert sum(merged.values()) == sum(separate.values()) - saved * layers


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_merged_norms_give_the_same_logits(exports, precision):
    merged, separate = all_logits(exports[precision]), all_logits(exports[f"{precision}-separate"])
    # float32 rounding only; int4's int8 activations can turn a last-bit difference into a
    # different rounding of one activation, hence the looser bound there
    atol = 1e-4 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(merged, separate, atol=atol)
    assert (merged.argmax(-1) == separate.argmax(-1)).all()


def test_fp16_graphs_keep_one_norm_each(tmp_path):
    """In fp16 the extra Mul would round once more than the fused norm: the cuda graph keeps
    the norms apart."""
    artifact = export_model("tiny-qwen3", "fp16", tmp_path / "cuda", target="cuda")
    layers = load_manifest(artifact).num_layers
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    norms = [node for node in graph.node if node.op_type == "SimplifiedLayerNormalization"]
    assert len(norms) == 2 * layers + 1
