"""export/bench_quality.py's own pieces: reading llama-perplexity's statistics, bits per weight
of fermi artifacts, and the F32 GGUF rewrite (the llama.cpp build itself is a benchmark step,
not a test)."""

from __future__ import annotations

import numpy as np
import pytest

from export import bench_quality

LOG = """
llama_model_loader: - type q4_0:  211 tensors
====== Perplexity statistics ======
Mean PPL(Q)                   :  22.905419 ±   1.083101
Mean PPL(base)                :  18.142273 ±   0.846802
Cor(ln(PPL(Q)), ln(PPL(base))):  94.10%
Mean ln(PPL(Q)/PPL(base))     :   0.233207 ±   0.010316
Mean PPL(Q)/PPL(base)         :   1.262650 ±   0.013026
====== KL divergence statistics ======
Mean    KLD:   0.290125 ±   0.005327
Maximum KLD:   4.613553
99.9%   KLD:   3.480215
99.0%   KLD:   1.433100
95.0%   KLD:   0.812511
Median  KLD:   0.185541
====== Token probability statistics ======
RMS Δp    : 14.322 ± 0.294 %
Same top p: 68.571 ± 0.777 %
"""


def test_reads_llama_perplexity_statistics():
    values = {k: bench_quality._float(p, LOG) for k, p in bench_quality.PATTERNS.items()}
    assert values == {
        "ppl": 22.905419,
        "ppl_ref": 18.142273,
        "ppl_ratio": 1.26265,
        "kl_mean": 0.290125,
        "kl_p99": 1.4331,
        "kl_median": 0.185541,
        "kl_max": 4.613553,
        "top1": 68.571,
    }
    summary = "llama_model_quantize_impl: quant size  =    85.77 MiB (5.35 BPW)"
    assert bench_quality._float(bench_quality.QUANT_BPW, summary) == 5.35
    with pytest.raises(RuntimeError, match="printed no"):
        bench_quality._float(bench_quality.PATTERNS["kl_mean"], "nothing")


def test_bits_per_weight_of_fermi_artifacts(tmp_path):
    """fp32 is 32 bits a weight exactly (the RoPE tables not counted); int8 and int4 are
    their codes plus float32 scales (and int4 zero points), with the int8 head."""
    from test_export_parity import CASES, make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", *CASES["qwen3-tied"])
    params = bench_quality.parameter_count(checkpoint)
    bpw = {}
    for name in bench_quality.VARIANTS:
        artifact = bench_quality.fermi_artifacts(checkpoint, tmp_path / "art", [name])[name]
        bpw[name] = 8 * bench_quality.weight_bytes(artifact) / params
    assert bpw["fp32"] == pytest.approx(32.0)
    assert bpw["int4-plain"] < bpw["int4-asym"] < bpw["int8"] < 10


def test_f32_gguf_dequantizes_and_keeps_metadata(tmp_path):
    import gguf

    source = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_block_count(1)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor(
        "blk.0.ffn_down.weight",
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = bench_quality.f32_gguf(source, tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert reader.fields["llama.block_count"].contents() == 1
    (tensor,) = reader.tensors
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(tensor.data.reshape(4, 64), w, atol=np.abs(w).max() / 127)
