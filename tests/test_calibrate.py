"""Calibrated int4 (export/calibrate.py, export/gptq.py): GPTQ's error-compensated rounding, AWQ's
scales folded so the float model is unchanged, and the `gptq` scheme's export."""

from __future__ import annotations

import numpy as np
import pytest

from export import calibrate, gptq, quantize

RNG = np.random.default_rng(0)


MIXING = np.random.default_rng(1).normal(size=(64, 64)) / 8 + np.eye(64)
LOUDNESS = np.random.default_rng(2).uniform(0.2, 3.0, 64)


def correlated_inputs(t: int = 512, k: int = 64) -> np.ndarray:
    """Inputs (t, k) whose channels are correlated and unevenly scaled, like activations; all
    drawn from one distribution."""
    return (RNG.normal(size=(t, 64)) @ MIXING * LOUDNESS)[:, :k].astype(np.float32)


def weights(n: int = 48, k: int = 64) -> np.ndarray:
    return (RNG.standard_t(4, (n, k)) * 0.05).astype(np.float32)


def dequantized(codes, scales, zeros, block: int) -> np.ndarray:
    z = np.repeat(zeros.astype(np.float32), block, 1)
    return np.repeat(scales, block, 1) * (codes.astype(np.float32) - z)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_uncorrelated_inputs_is_plain_rounding(act_order):
    """H = I: no error to push onward, so each block is the plain weighted-search fit."""
    w = weights()
    codes, scales, zeros = gptq.quantize_gptq(w, np.eye(64), 32, act_order)
    for block in range(2):
        columns = slice(32 * block, 32 * (block + 1))
        scale, zero, expected = quantize._fit_asymmetric(w[:, columns], True)
        np.testing.assert_array_equal(codes[:, columns], expected)
        np.testing.assert_allclose(scales[:, block], scale, rtol=1e-6)  # summation order
        np.testing.assert_array_equal(zeros[:, block], zero)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_correlated_inputs(act_order):
    """tr(dW H dW^T), the layer's summed squared output change on the calibration inputs, is
    clearly lower than with round-to-nearest of the same block fit, on held-out inputs too."""
    w, x, held_out = weights(), correlated_inputs(), correlated_inputs()
    h = (x.T @ x).astype(np.float64)
    q = dequantized(*gptq.quantize_gptq(w, h, 32, act_order), 32)
    nearest = quantize.dequantize_asymmetric(*quantize.quantize_asymmetric(w, 32), 64)
    assert gptq.output_error(w, q, h) < 0.8 * gptq.output_error(w, nearest, h)
    h2 = (held_out.T @ held_out).astype(np.float64)
    assert gptq.output_error(w, q, h2) < gptq.output_error(w, nearest, h2)
    assert np.all((0 <= q - q) & (np.abs(q - w) < 0.5 * np.abs(w).max()))


def test_gptq_dead_inputs_and_padding():
    """Inputs that never fire get zero weight; K padded to a whole block comes back cut."""
    w, x = weights(8, 40), correlated_inputs(256, 40)
    x[:, 5] = 0
    packed, scales, zeros = quantize.quantize_calibrated(w, (x.T @ x).astype(np.float64), 32)
    assert packed.shape == (8, 2, 16) and scales.shape == (8, 2) and zeros.shape == (8, 1)
    back = quantize.dequantize_asymmetric(packed, scales, zeros, 40)
    assert back.shape == (8, 40)
    assert np.all(np.abs(back[:, 5]) <= scales[:, 0] / 2 + 1e-7)


def test_awq_scale_is_no_worse_than_none_and_follows_loud_channels():
    """The search's pick never has a larger output error than s = 1 (alpha 0, a candidate), and
    with a few loud input channels it scales those channels' weights up."""
    w = weights(64, 64)
    x = correlated_inputs(512, 64)
    x[:, :4] *= 20
    stats = calibrate.Statistics(x)
    s = calibrate.awq_scale([w], stats)
    assert s.shape == (64,) and np.all(s > 0)
    assert s[:4].mean() > s[4:].mean()

    def error(scale):
        fitted = quantize.quantize_asymmetric((w * scale).astype(np.float32), 32, search=False)
        back = quantize.dequantize_asymmetric(*fitted, 64) / scale
        return gptq.output_error(w, back, stats.hessian)

    assert error(s) <= error(np.ones(64))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight Qwen3 checkpoint (q/k norms, GQA) with Qwen2-style q/k/v biases added,
    and a real tokenizer for the calibration text."""
    from test_export_parity import CASES, make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), *CASES["qwen3-tied"])


def test_scaled_weights_compute_the_same_float_model(tiny_checkpoint):
    """AWQ's scales are folded, not approximated: the scaled checkpoint's float layers give
    the original's outputs, while the scaled tensors themselves differ. GPTQ's codes come per
    layer, stacked weights as their parts' rows, and only while that layer is current."""
    from export.architectures import model_config
    from export.checkpoint import Checkpoint

    with Checkpoint(tiny_checkpoint) as checkpoint:
        cfg = model_config(checkpoint.config)
        tokens = calibrate.calibration_tokens(tiny_checkpoint / "tokenizer.json", cfg.vocab_size)
        scaled = calibrate.CalibratedCheckpoint(checkpoint, cfg, tokens[:, :64], lambda n: True)
        x = np.asarray(checkpoint.tensor("model.embed_tokens.weight"), np.float32)[tokens[:, :64]]
        norm = "model.layers.0.input_layernorm.weight"
        assert not np.allclose(scaled.tensor(norm), checkpoint.tensor(norm))
        for layer in range(cfg.num_layers):
            expected = scaled._layer(layer, x, scaled._base, lambda group, a: None)
            got = scaled._layer(layer, x, scaled.tensor, lambda group, a: None)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            x = expected
        q = scaled.quantized(f"model.layers.{layer}.self_attn.q_proj.weight")
        qk = scaled.quantized(f"model.layers.{layer}.self_attn.q_proj+k_proj.weight")
        k_rows = cfg.num_kv_heads * cfg.head_dim
        assert len(qk[0]) == len(q[0]) + k_rows and len(qk[1]) == len(qk[2]) == len(qk[0])
        np.testing.assert_array_equal(qk[0][: len(q[0])], q[0])
        assert scaled.quantized("lm_head.weight") is None
        with pytest.raises(RuntimeError, match="already released"):
            scaled.quantized("model.layers.0.mlp.down_proj.weight")


def test_calibration_needs_enough_text(tmp_path, tiny_checkpoint):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="calibration needs 512"):
        calibrate.calibration_tokens(tiny_checkpoint / "tokenizer.json", 1000, short)


def test_gptq_export_is_closer_to_fp32_than_mix(tiny_checkpoint, tmp_path):
    """The `gptq` scheme exports MatMulNBits with zero points where `mix` has them, records its
    name, and its logits are closer to fp32's than the uncalibrated mix's (KL on the
    calibration-free token set of export/quality.py)."""
    from export.exporter import export_model
    from export.quality import all_logits, compare, token_set
    from export.variants import GraphOptions
    from fermi.artifact import load_manifest

    fp32 = export_model(str(tiny_checkpoint), "fp32", tmp_path / "fp32", target="cpu")
    kl = {}
    for scheme in ("gptq", "mix"):
        artifact = export_model(
            str(tiny_checkpoint), "int4", tmp_path / scheme, target="cpu",
            options=GraphOptions(int4=scheme),
        )  # fmt: skip
        assert load_manifest(artifact).graph_options["int4"] == scheme
        tokens = token_set(load_manifest(artifact).vocab_size, 2, 64)
        kl[scheme] = compare(all_logits(fp32, tokens), all_logits(artifact, tokens))["kl_mean"]
    assert kl["gptq"] < kl["mix"]
