"""int4 with zero points and searched scales (export/quantize.py): reconstruction error, the
zero points as onnxruntime's MatMulNBits kernel reads them, and the mix rules."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export import quantize

RNG = np.random.default_rng(0)


def weights(n: int = 64, k: int = 96) -> np.ndarray:
    """Rows with an offset and a spread per row, heavy-tailed like trained weights."""
    w = RNG.standard_t(4, (n, k)) * RNG.uniform(0.01, 0.1, (n, 1)) + RNG.normal(0, 0.02, (n, 1))
    return w.astype(np.float32)


def test_asymmetric_round_trip_stays_within_a_step():
    w = weights(40, 72)  # K pads to 96: three blocks, the last one part padding
    packed, scales, zeros = quantize.quantize_asymmetric(w, 32)
    assert (packed.shape, scales.shape, zeros.shape) == ((40, 3, 16), (40, 3), (40, 2))
    back = quantize.dequantize_asymmetric(packed, scales, zeros, 72)
    padded = np.pad(w, ((0, 0), (0, 24))).reshape(40, 3, 32)
    span = padded.max(-1) - np.minimum(padded.min(-1), 0)
    step = np.repeat(span / 15, 32, axis=1)[:, :72]
    # The searched scale may shrink the grid so that an extreme weight clips, by at most a
    # step and a half of the min-max grid (rmin = -1 of 15 levels); most weights move less
    # than half a step.
    error = np.abs(back - w)
    assert (error <= 1.5 * step + 1e-7).all()
    assert (error <= 0.5 * step + 1e-7).mean() > 0.95


def weighted_error(w: np.ndarray, back: np.ndarray) -> float:
    blocks = w.reshape(len(w), -1, 32)
    c = np.sqrt((blocks**2).mean(-1, keepdims=True)) + np.abs(blocks)
    return float((c * (back.reshape(blocks.shape) - blocks) ** 2).sum())


def test_search_beats_min_max_and_symmetric():
    w = weights(256, 128)
    searched = quantize.dequantize_asymmetric(*quantize.quantize_asymmetric(w, 32), 128)
    min_max = quantize.dequantize_asymmetric(
        *quantize.quantize_asymmetric(w, 32, search=False), 128
    )
    packed, scales = quantize.quantize_blockwise(w, 4, 32)
    symmetric = quantize.dequantize_blockwise(packed, scales, 4, 128)
    errors = [weighted_error(w, x) for x in (searched, min_max, symmetric)]
    assert errors[0] < 0.9 * errors[1] < 0.9 * errors[2], errors


def test_constant_and_zero_blocks_are_exact():
    w = np.zeros((3, 64), np.float32)
    w[1, :32] = -0.25  # all equal and negative: q = 0, z = 15
    w[2] = 0.5  # all equal and positive: the grid spans 0 .. 0.5
    back = quantize.dequantize_asymmetric(*quantize.quantize_asymmetric(w, 32), 64)
    np.testing.assert_allclose(back, w, atol=1e-7)


def matmul_nbits_graph(n: int, k: int, block: int, bits: int, accuracy: int, zeros: bool):
    inputs = ["A", "B", "scales"] + (["zero_points"] if zeros else [])
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "one_matmul",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, ["S", k]),
            helper.make_tensor_value_info("B", TensorProto.UINT8, None),
            helper.make_tensor_value_info("scales", TensorProto.FLOAT, None),
        ]
        + [helper.make_tensor_value_info("zero_points", TensorProto.UINT8, None)] * zeros,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["S", n])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("accuracy", [0, 4])
def test_matmul_nbits_reads_the_zero_points(accuracy):
    """onnxruntime's kernel computes x @ dequantize(W)^T with our zero points: exact to float
    rounding with float activations (accuracy 0); with activations quantized to int8 per block
    (accuracy 4, the cpu default) within int8's rounding of x."""
    n, k, block = 48, 160, 32  # 5 blocks a row: an odd count, so the zero points pad a nibble
    w = weights(n, k)
    packed, scales, zeros = quantize.quantize_asymmetric(w, block)
    assert len(np.unique(zeros & 0xF)) > 3  # the zero points really vary
    x = RNG.standard_normal((5, k)).astype(np.float32)
    session = matmul_nbits_graph(n, k, block, 4, accuracy, zeros=True)
    got = session.run(None, {"A": x, "B": packed, "scales": scales, "zero_points": zeros})[0]
    expected = x @ quantize.dequantize_asymmetric(packed, scales, zeros, k).T
    tolerance = 1e-4 if accuracy == 0 else 2e-2
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * scale)
    # Without them the kernel assumes 8: a different (wrong) result.
    plain = matmul_nbits_graph(n, k, block, 4, accuracy, zeros=False)
    wrong = plain.run(None, {"A": x, "B": packed, "scales": scales})[0]
    assert np.abs(wrong - expected).max() > 10 * np.abs(got - expected).max()


def test_int8_blocks_widen_to_what_divides_k():
    assert quantize.int8_block(1024, 32) == 128
    assert quantize.int8_block(576, 32) == 64  # SmolLM2's hidden size
    assert quantize.int8_block(1536, 32) == 128
    assert quantize.int8_block(48, 32) == 32  # nothing wider divides: the graph's block
    assert quantize.int8_block(48, 16) == 16


def test_use_more_bits_is_llama_cpps_rule():
    # 32 layers (Llama-7B): the first 4, the last 4, and 6, 9, 12 ... between
    picked = [i for i in range(32) if quantize.use_more_bits(i, 32)]
    assert picked == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    # 30 layers (SmolLM2-135M): eighth = 3, 7 * 30 // 8 = 26
    picked = [i for i in range(30) if quantize.use_more_bits(i, 30)]
    assert picked == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_projection_names():
    assert quantize.projection_of("model.layers.3.mlp.down_proj.weight") == (3, "down_proj")
    assert quantize.projection_of("model.layers.3.mlp.down_proj") == (3, "down_proj")
    stacked = "model.layers.12.self_attn.q_proj+k_proj.weight"
    assert quantize.projection_of(stacked) == (12, "q_proj")
    assert quantize.projection_of("lm_head.weight") is None
    assert quantize.projection_of("model.embed_tokens.weight") is None


def test_mix_rules():
    more = [i for i in range(30) if quantize.use_more_bits(i, 30)]
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        part = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        chosen = [
            i
            for i in range(30)
            if quantize.int8_in_mix(f"model.layers.{i}.{part}.{projection}.weight", 30)
        ]
        expected = {
            "all": list(range(30)),
            "more": more,
            "more_past_first_eighth": [i for i in more if i >= 3],
        }.get(quantize.MIX_INT8.get(projection), [])
        assert chosen == expected, projection
    assert not quantize.int8_in_mix("lm_head.weight", 30)
    assert not quantize.int8_in_mix("model.embed_tokens.weight", 30)


@pytest.mark.parametrize("head", ["int8", "int4"])
@pytest.mark.parametrize("scheme", ["gptq", "mix", "asym", "plain"])
def test_exported_graph_follows_the_scheme(scheme, head, tmp_path):
    """Every layer matmul of an int4 export: int8 exactly where the mix rule says (mix only),
    zero points on the int4 ones unless plain; the head (int8 or int4) stays symmetric, since
    the tied embedding reads the same codes without zero points, and agrees with fp32."""
    import onnx
    from test_export_parity import CASES, make_checkpoint

    from export.exporter import export_model
    from export.variants import GraphOptions
    from fermi.artifact import MODEL_FILE, load_manifest

    checkpoint = make_checkpoint(tmp_path / "ckpt", *CASES["qwen3-tied"])
    artifact = export_model(
        str(checkpoint), "int4", tmp_path / scheme, target="cpu",
        options=GraphOptions(int4=scheme, head=head),
    )  # fmt: skip
    layers = load_manifest(artifact).num_layers
    assert load_manifest(artifact).graph_options["int4"] == scheme
    graph = onnx.load(str(artifact / MODEL_FILE), load_external_data=False).graph
    seen = set()
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        bits = next(a.i for a in node.attribute if a.name == "bits")
        weight = node.name.removesuffix("/MatMulNBits")
        if quantize.projection_of(weight) is None:  # the head
            assert bits == {"int8": 8, "int4": 4}[head] and len(node.input) == 3
            continue
        int8 = scheme in ("gptq", "mix") and quantize.int8_in_mix(weight, layers)
        assert bits == (8 if int8 else 4), weight
        assert (len(node.input) == 4) == (bits == 4 and scheme != "plain"), weight
        seen.add(quantize.projection_of(weight)[1])
    assert seen >= {"q_proj", "o_proj", "gate_proj", "down_proj"}
    from test_fast_graphs import assert_agrees_with_fp32

    assert_agrees_with_fp32(checkpoint, artifact, "int4", tmp_path)
