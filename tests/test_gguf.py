"""GGUF import on small files written here with gguf.GGUFWriter and gguf.quants.quantize (the
writer and quantizers llama.cpp's own converter uses): tensor types against gguf's dequantize,
llama.cpp's q/k row permutation, metadata -> config, the tokenizer, carried-over blocks, fp32
parity with transformers loading the same file, and bad files as one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from export import tiny
from export.exporter import export_model
from export.gguf_carry import carry_blocks
from export.gguf_checkpoint import SUPPORTED_TYPES, GGUFCheckpoint
from export.variants import GraphOptions
from fermi.bench.gguf_export import _add_tokenizer
from fermi.engine import Engine
from fermi.errors import ModelNotFound, UnsupportedArchitecture
from fermi.settings import load_settings

Q = gguf.GGMLQuantizationType
SHAPE = {  # K-quants need rows of 256: hidden and intermediate are multiples of it
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBALS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
PROMPT = "Hello world, this is a test of the tokenizer and the model."


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base in GLOBALS:
        return f"{GLOBALS[base]}.{kind}"
    _, _, layer, part = base.split(".", 3)
    return f"blk.{layer}.{LAYER_PARTS[part]}.{kind}"


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, as written there."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def random_weights(arch: str, vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    q, kv = SHAPE["num_attention_heads"] * 64, SHAPE["num_key_value_heads"] * 64

    def mat(n, k, std=0.08):
        return (rng.standard_normal((n, k)) * std).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, h, 0.5), "model.norm.weight": norm(h)}
    if not tied:
        w["lm_head.weight"] = mat(vocab, h)
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w |= {
            f"{p}.input_layernorm.weight": norm(h),
            f"{p}.post_attention_layernorm.weight": norm(h),
            f"{p}.self_attn.q_proj.weight": mat(q, h),
            f"{p}.self_attn.k_proj.weight": mat(kv, h),
            f"{p}.self_attn.v_proj.weight": mat(kv, h),
            f"{p}.self_attn.o_proj.weight": mat(h, q),
            f"{p}.mlp.gate_proj.weight": mat(inter, h),
            f"{p}.mlp.up_proj.weight": mat(inter, h),
            f"{p}.mlp.down_proj.weight": mat(h, inter),
        }
        if arch == "qwen2":
            for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                w[f"{p}.self_attn.{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if arch == "qwen3":
            w[f"{p}.self_attn.q_norm.weight"] = norm(64)
            w[f"{p}.self_attn.k_norm.weight"] = norm(64)
    return w


def stored(hf: str, w: np.ndarray, arch: str) -> np.ndarray:
    """The float tensor as the GGUF holds it: llama's q/k rows permuted."""
    if arch == "llama" and ".q_proj." in hf:
        return llama_permute(w, SHAPE["num_attention_heads"])
    if arch == "llama" and ".k_proj." in hf:
        return llama_permute(w, SHAPE["num_key_value_heads"])
    return w


# Byte offsets of the fp16 fields of a K-quant block (ggml-common.h): gguf.quants dequantizes
# these types but cannot quantize them, so tests write random blocks with sane scales.
# The ranges keep the weights near a trained model's (|w| < ~0.3).
K_QUANT_HALVES = {"Q4_K": ((0, 2), 1.5e-4), "Q5_K": ((0, 2), 1e-4), "Q6_K": ((208,), 2e-5)}


def encode(data: np.ndarray, kind, rng: np.random.Generator) -> np.ndarray:
    """`data` (N, K) as GGUF stores `kind`: quantized by gguf, or random K-quant blocks."""
    if kind.name not in K_QUANT_HALVES:
        return gguf.quants.quantize(data, kind)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (data.shape[0], data.shape[1] // block, size), dtype=np.uint8)
    offsets, top = K_QUANT_HALVES[kind.name]
    for offset in offsets:
        half = rng.uniform(top / 4, top, raw.shape[:2]).astype(np.float16)
        raw[..., offset : offset + 2] = half[..., None].view(np.uint8)
    return raw.reshape(data.shape[0], -1)


def write_gguf(
    path: Path,
    arch: str = "llama",
    qtype=Q.F32,
    tied: bool = True,
    types: dict[str, object] | None = None,
    metadata: dict[str, object] | None = None,
    skip: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A small model as llama.cpp would write it; returns the float weights by HF name and the
    GGUF data of each (quantized bytes or floats, q/k rows permuted for llama). Linear weights
    get `qtype` (or `types[name]`), norms and biases stay F32, as llama.cpp keeps them."""
    checkpoint = tiny.checkpoint_path(load_settings())
    config = json.loads((checkpoint / "config.json").read_text())
    weights = random_weights(arch, config["vocab_size"], tied, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(SHAPE["hidden_size"])
    writer.add_block_count(SHAPE["num_hidden_layers"])
    writer.add_feed_forward_length(SHAPE["intermediate_size"])
    writer.add_head_count(SHAPE["num_attention_heads"])
    writer.add_head_count_kv(SHAPE["num_key_value_heads"])
    writer.add_key_length(SHAPE["head_dim"])
    writer.add_value_length(SHAPE["head_dim"])
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    _add_tokenizer(writer, gguf, checkpoint, config)
    rng, raw = np.random.default_rng(seed), {}
    for hf, w in weights.items():
        if hf in skip:
            continue
        kind = (types or {}).get(hf, qtype if w.ndim == 2 else Q.F32)
        data = stored(hf, w, arch)
        if kind == Q.F32:
            raw[hf] = data
            writer.add_tensor(gguf_name(hf), data)
        elif kind == Q.F16:
            raw[hf] = data.astype(np.float16)
            writer.add_tensor(gguf_name(hf), raw[hf])
        else:
            raw[hf] = encode(data, kind, rng)
            writer.add_tensor(gguf_name(hf), raw[hf], raw_dtype=kind)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights, raw


def logits(artifact: Path, ids: list[int]) -> np.ndarray:
    engine = Engine(artifact, "cpu")
    return engine.forward(ids, engine.new_cache(), last_only=False).reshape(len(ids), -1)


def prompt_ids(artifact: Path) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    return tokenizer.encode(PROMPT, add_special_tokens=False).ids


def export(path: Path, out: Path, precision="fp32", **options) -> Path:
    return export_model(
        str(path), precision=precision, target="cpu", output=out, options=GraphOptions(**options)
    )


# -- tensor types, permutation, metadata ---------------------------------------------------------


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_each_tensor_type_reads_as_gguf_dequantizes_it(tmp_path, kind):
    qtype = Q[kind]
    path = tmp_path / "m.gguf"
    weights, raw = write_gguf(path, "llama", qtype)
    with GGUFCheckpoint(path) as ckpt:
        for name in (
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
        ):
            assert ckpt.ggml_type(name) == kind
            want = gguf.quants.dequantize(raw[name], qtype).astype(np.float32)
            heads = SHAPE["num_attention_heads"]
            if ".q_proj." in name:  # the checkpoint undoes llama.cpp's permutation
                want = want.reshape(heads, 32, 2, -1).swapaxes(1, 2).reshape(want.shape)
            got = ckpt.tensor(name)
            assert got.dtype == np.float32 and got.shape == weights[name].shape
            np.testing.assert_array_equal(got, want)


def test_llama_q_and_k_rows_come_back_in_hf_order(tmp_path):
    path = tmp_path / "m.gguf"
    weights, _ = write_gguf(path, "llama", Q.F32)
    with GGUFCheckpoint(path) as ckpt:
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            full = f"model.layers.0.{name}"
            np.testing.assert_array_equal(ckpt.tensor(full), weights[full])
            # the raw blocks are unpermuted the same way (whole rows move)
            np.testing.assert_array_equal(
                ckpt.blocks(full).view(np.float32).reshape(weights[full].shape), weights[full]
            )


def test_metadata_becomes_the_config(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen2", Q.Q8_0, tied=False)
    with GGUFCheckpoint(path) as ckpt:
        config = ckpt.config
    vocab = json.loads((tiny.checkpoint_path(load_settings()) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] == 256 and config["intermediate_size"] == 512
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 64
    assert config["rope_theta"] == 500000.0
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == vocab["vocab_size"]
    assert config["tie_word_embeddings"] is False
    assert config["attention_bias"] is True
    assert (
        config["eos_token_id"]
        == json.loads(
            (tiny.checkpoint_path(load_settings()) / "generation_config.json").read_text()
        )["eos_token_id"][0]
    )
    assert "rope_scaling" not in config
    write_gguf(path, "llama", Q.F32)
    with GGUFCheckpoint(path) as ckpt:
        assert ckpt.config["tie_word_embeddings"] is True
        assert ckpt.config["attention_bias"] is False


def test_rope_scaling_from_metadata(tmp_path):
    path = tmp_path / "m.gguf"
    meta = {
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 1024,
    }
    write_gguf(path, "llama", Q.F32, metadata=meta)
    with GGUFCheckpoint(path) as ckpt:
        assert ckpt.config["rope_scaling"] == {
            "rope_type": "linear",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        }


def test_llama3_rope_freqs_become_rope_scaling_or_a_clear_refusal(tmp_path):
    from export.gguf_checkpoint import llama3_rope_factors

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv = 1.0 / 500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    factors = llama3_rope_factors(inv, scaling).astype(np.float32)
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", Q.F32, extra_tensors={"rope_freqs.weight": factors})
    with GGUFCheckpoint(path) as ckpt:
        assert ckpt.config["rope_scaling"] == scaling
    write_gguf(path, "llama", Q.F32, extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(UnsupportedArchitecture, match="rope_freqs"):
        GGUFCheckpoint(path)


# -- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_and_chat_template_come_from_the_metadata(tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3", Q.F32)
    artifact = export(path, tmp_path / "art")
    source = tiny.checkpoint_path(load_settings())
    original = Tokenizer.from_file(str(source / "tokenizer.json"))
    converted = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    for text in (PROMPT, "  odd   spacing\n\tand 数字 123456 🎉", "<|im_start|>user\nhi<|im_end|>"):
        ids = original.encode(text, add_special_tokens=False).ids
        assert converted.encode(text, add_special_tokens=False).ids == ids
        assert converted.decode(ids, skip_special_tokens=False) == original.decode(
            ids, skip_special_tokens=False
        )
    config = json.loads((artifact / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    template = json.loads((source / "tokenizer_config.json").read_text())["chat_template"]
    assert config["chat_template"] == template
    manifest = json.loads((artifact / "fermi.json").read_text())
    assert manifest["eos_token_ids"] == [original.token_to_id("<|im_end|>")]
    assert manifest["supports_thinking"] is True  # Qwen3's template, carried in the GGUF


# -- export: fp32 against the source, carried-over blocks ----------------------------------------


def test_gguf_export_equals_the_safetensors_export(tmp_path, tiny_artifact):
    """tiny-qwen3 written as an f32 GGUF exports to the same logits as from safetensors."""
    from fermi.bench.gguf_export import write_gguf as write_checkpoint_gguf

    path = write_checkpoint_gguf(tiny.checkpoint_path(load_settings()), tmp_path / "tiny.gguf")
    artifact = export(path, tmp_path / "art")
    ids = prompt_ids(tiny_artifact)
    assert prompt_ids(artifact) == ids
    np.testing.assert_allclose(logits(artifact, ids), logits(tiny_artifact, ids), atol=1e-4)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_carried_blocks_are_the_same_numbers(kind):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 2.0, (48, 1))).astype(np.float32)
    w[3, :32] = 0.7  # a constant block
    raw = gguf.quants.quantize(w, Q[kind])
    want = gguf.quants.dequantize(raw, Q[kind])
    codes, scales, mins = carry_blocks(kind, raw)
    if kind == "Q8_0":
        values = codes.astype(np.float32) - 128
    else:
        nibbles = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:2], 32)
        values = nibbles.astype(np.float32) - (8 if kind == "Q4_0" else 0)
    got = values * scales[..., None] + (0 if mins is None else mins[..., None])
    np.testing.assert_array_equal(got.reshape(w.shape), want)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_carried_export_equals_fp32(tmp_path, kind):
    """With float activations (accuracy_level 0) the carried graph computes the same logits as
    the fp32 export of the same file: nothing was quantized again. The manifest says so."""
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", Q[kind], tied=False, types={"lm_head.weight": Q.Q8_0})
    fp32 = export(path, tmp_path / "fp32")
    precision = "int8" if kind == "Q8_0" else "int4"
    carried = export(path, tmp_path / "q", precision, accuracy_level=0)
    ids = prompt_ids(fp32)
    # float32 rounding only (these random weights give logits up to ~20); quantizing again
    # moves them by whole units (11.6 measured for the Q4_1 + Q4_0 file below)
    np.testing.assert_allclose(logits(carried, ids), logits(fp32, ids), atol=3e-4)
    manifest = json.loads((carried / "fermi.json").read_text())
    weights = manifest["weights"]
    assert weights["model.layers.0.self_attn.q_proj.weight"] == {
        "gguf_type": kind,
        "stored": "carried",
    }
    assert weights["lm_head.weight"]["stored"] == "carried"  # Q8_0 head, int8 head precision
    assert weights["model.norm.weight"] == {"gguf_type": "F32", "stored": "float"}
    assert weights["model.embed_tokens.weight"]["stored"] == "float"


def test_default_precision_of_a_quantized_gguf_carries_and_requantizes(tmp_path):
    path = tmp_path / "m.gguf"
    types = {f"model.layers.{i}.mlp.down_proj.weight": Q.Q6_K for i in range(2)}
    write_gguf(path, "llama", Q.Q4_0, types=types)
    artifact = export_model(str(path), precision=None, target="cpu", output=tmp_path / "art")
    manifest = json.loads((artifact / "fermi.json").read_text())
    assert manifest["precision"] == "int4"
    weights = manifest["weights"]
    assert weights["model.layers.0.mlp.gate_proj.weight"]["stored"] == "carried"
    assert weights["model.layers.0.mlp.down_proj.weight"] == {
        "gguf_type": "Q6_K",
        "stored": "requantized",
    }
    assert weights["model.embed_tokens.weight"]["stored"] == "requantized"  # Q4_0 vs int8 head
    float_file = tmp_path / "f.gguf"
    write_gguf(float_file, "llama", Q.F16)
    artifact = export_model(str(float_file), precision=None, target="cpu", output=tmp_path / "f")
    assert json.loads((artifact / "fermi.json").read_text())["precision"] == "fp32"


# -- parity with transformers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "kind", "tied"),
    [("llama", "Q4_1", True), ("llama", "Q4_K", False), ("qwen2", "Q8_0", False),
     ("qwen3", "Q6_K", True), ("llama", "Q5_K", True), ("qwen2", "BF16", True)],
)  # fmt: skip
def test_fp32_parity_with_transformers_loading_the_same_gguf(tmp_path, arch, kind, tied):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = tmp_path / "m.gguf"
    write_gguf(path, arch, Q[kind], tied=tied)
    artifact = export(path, tmp_path / "art")
    # transformers' GGUF config map for qwen3 skips attention.key_length (its head_dim then
    # defaults to 128), so the head size is passed as the file says it.
    extra = {"head_dim": SHAPE["head_dim"]} if arch == "qwen3" else {}
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, **extra
    )
    ids = prompt_ids(artifact)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = logits(artifact, ids)
    assert np.abs(got - want).max() <= 1e-4


# -- bad input -----------------------------------------------------------------------------------


def run_export(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fermi.cli", "export", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_gguf_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good, "llama", Q.Q4_0)
    data = good.read_bytes()
    cases = {
        "garbage.gguf": (b"this is not a gguf file at all" * 10, "not a readable GGUF"),
        "truncated.gguf": (data[: len(data) // 3], "not a readable GGUF"),
        "empty.gguf": (b"", "not a readable GGUF"),
        "header.gguf": (data[:64], "not a readable GGUF"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert_one_line_error(
            run_export(str(tmp_path / name), "--output", str(tmp_path / "o")), words
        )
    assert_one_line_error(run_export(str(tmp_path / "missing.gguf")), "does not exist")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_type_and_tensor_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", Q.Q5_0)
    with pytest.raises(UnsupportedArchitecture, match="Q5_0"):
        GGUFCheckpoint(path)
    write_gguf(path, "llama", Q.F32, extra_tensors={"blk.0.attn_qkv.weight": np.zeros((4, 4))})
    with pytest.raises(UnsupportedArchitecture, match="attn_qkv"):
        GGUFCheckpoint(path)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run_export(str(path)), "GGUF architecture gpt2 is not supported")
    write_gguf(path, "llama", Q.F32, skip=("model.embed_tokens.weight",))
    with pytest.raises(ModelNotFound, match="token_embd"):
        GGUFCheckpoint(path)


# -- a hub repo's GGUF file ----------------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_hub_gguf(cache: Path) -> None:
    """example/tiny-gguf's model-Q8_0.gguf at COMMIT (main), laid out in the HF cache `cache` as
    hf_hub_download leaves it."""
    repo = cache / "models--example--tiny-gguf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    write_gguf(repo / "snapshots" / COMMIT / "model-Q8_0.gguf", "llama", Q.Q8_0)


def test_gguf_file_of_a_hub_repo_from_the_cache(tmp_path):
    """`fermi export ORG/REPO --gguf-file NAME` through huggingface_hub's cache (offline here)."""
    cache = tmp_path / "hub"
    cache_hub_gguf(cache)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "FERMI_ARTIFACTS": str(tmp_path)}
    done = run_export("example/tiny-gguf", "--gguf-file", "model-Q8_0.gguf", env=env)
    assert done.returncode == 0, done.stderr
    artifact = Path(done.stdout.strip())
    assert artifact.name == "model-Q8_0-int8-cpu"
    manifest = json.loads((artifact / "fermi.json").read_text())
    assert manifest["source"] == "example/tiny-gguf/model-Q8_0.gguf"
    assert manifest["revision"] == COMMIT
    done = run_export("example/tiny-gguf", "--gguf-file", "other.gguf", env=env)
    assert_one_line_error(done, "example/tiny-gguf", "offline")


def export_online(
    hub: str, tmp_path: Path, *args: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`fermi export ARGS` online (no FERMI_OFFLINE/HF_HUB_OFFLINE, no token; `env` added) with
    the Hub at the URL `hub` and HF_HOME, the HF cache and the artifacts under tmp_path."""
    offline = ("FERMI_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    here = {
        "HF_ENDPOINT": hub,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "FERMI_ARTIFACTS": str(tmp_path / "art"),
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    base = {k: v for k, v in os.environ.items() if k not in offline}
    return subprocess.run([sys.executable, "-m", "fermi.cli", "export", *args],
                          capture_output=True, text=True, timeout=300,
                          env=base | (env or {}) | here)  # fmt: skip


@pytest.fixture
def closed_port() -> str:
    """A local URL where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def fake_hub():
    """A local stand-in for the Hub's file endpoint (/ORG/REPO/resolve/main/NAME) at hub.url:
    it serves hub.files at COMMIT and answers 404 EntryNotFound for other files, or 503 to
    everything while hub.down. hub.requests records those about example/ repos (not
    huggingface_hub's own, such as its agent registry)."""
    hub = SimpleNamespace(url="", files={}, down=False, requests=[])

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            if "/example/" in self.path:
                hub.requests.append(f"{self.command} {self.path}")
            body = None if hub.down else hub.files.get(self.path)
            if body is not None:
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            elif hub.down:
                self.send_response(503)
            else:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            if self.command == "GET" and body:
                self.wfile.write(body)

        do_HEAD = do_GET = answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()


def test_gguf_file_of_an_unreachable_hub_is_the_snapshot_error(tmp_path, closed_port):
    """No connection and a cold cache: the same one line as a whole repo, with none of
    huggingface_hub's retry warnings (it retried for ~20 s before saying so)."""
    gguf_file = export_online(closed_port, tmp_path, "example/tiny-gguf", "--gguf-file", "m.gguf")
    assert_one_line_error(gguf_file, "example/tiny-gguf", "unreachable", "not cached")
    assert "Retrying" not in gguf_file.stderr
    snapshot = export_online(closed_port, tmp_path, "example/tiny-gguf")
    assert gguf_file.stderr == snapshot.stderr


def test_gguf_file_of_a_hub_that_is_down_is_asked_once(tmp_path, fake_hub):
    """A Hub answering 503 is asked once, as for a whole repo, then the cache decides: a cold
    cache is the one-line error, a warm one exports the cached file. Offline asks nothing."""
    hub = fake_hub
    hub.down = True
    head = "HEAD /example/tiny-gguf/resolve/main/model-Q8_0.gguf"
    args = ("example/tiny-gguf", "--gguf-file", "model-Q8_0.gguf")
    assert_one_line_error(export_online(hub.url, tmp_path, *args), "unreachable", "not cached")
    assert hub.requests == [head]
    assert_one_line_error(export_online(hub.url, tmp_path, "example/tiny-gguf"), "unreachable")
    assert hub.requests == [head, "GET /api/models/example/tiny-gguf/revision/main"]

    cache_hub_gguf(tmp_path / "hub")
    hub.requests.clear()
    done = export_online(hub.url, tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert hub.requests == [head]
    manifest = json.loads((Path(done.stdout.strip()) / "fermi.json").read_text())
    assert manifest["source"] == "example/tiny-gguf/model-Q8_0.gguf"
    assert manifest["revision"] == COMMIT
    hub.requests.clear()
    done = export_online(hub.url, tmp_path, *args, "--force", env={"FERMI_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert hub.requests == []


def test_gguf_file_of_a_hub_that_answers_is_downloaded(tmp_path, fake_hub):
    """The Hub answers: the file is downloaded into the HF cache and exported; a file the repo
    does not have is the one-line "no such file" error."""
    hub = fake_hub
    write_gguf(tmp_path / "model-Q8_0.gguf", "llama", Q.Q8_0)
    served = (tmp_path / "model-Q8_0.gguf").read_bytes()
    hub.files["/example/tiny-gguf/resolve/main/model-Q8_0.gguf"] = served
    done = export_online(hub.url, tmp_path, "example/tiny-gguf", "--gguf-file", "model-Q8_0.gguf")
    assert done.returncode == 0, done.stderr
    cached = tmp_path / "hub/models--example--tiny-gguf/snapshots" / COMMIT / "model-Q8_0.gguf"
    assert cached.read_bytes() == served
    assert json.loads((Path(done.stdout.strip()) / "fermi.json").read_text())["revision"] == COMMIT
    done = export_online(hub.url, tmp_path, "example/tiny-gguf", "--gguf-file", "other.gguf")
    assert_one_line_error(done, "example/tiny-gguf has no such file", "--gguf-file")


def test_sampling_advice_and_end_of_turn_reach_generation_config(tmp_path):
    path = tmp_path / "m.gguf"
    meta = {
        "general.sampling.temp": 0.2,
        "general.sampling.top_p": 0.9,
        "general.sampling.top_k": 40,
        "tokenizer.ggml.eot_token_id": 5,
    }
    write_gguf(path, "llama", Q.Q8_0, metadata=meta)
    artifact = export(path, tmp_path / "art")
    generation = json.loads((artifact / "generation_config.json").read_text())
    eos = json.loads((artifact / "config.json").read_text())["eos_token_id"]
    assert generation["eos_token_id"] == [eos, 5]
    assert generation["do_sample"] is True
    assert generation["temperature"] == pytest.approx(0.2)
    assert generation["top_p"] == pytest.approx(0.9)
    assert generation["top_k"] == 40
    assert json.loads((artifact / "fermi.json").read_text())["eos_token_ids"] == [eos, 5]


@pytest.mark.parametrize(("table", "head"), [("Q4_0", "int4"), ("Q8_0", "int8")])
def test_a_tied_table_is_carried_into_the_head_and_the_embedding(tmp_path, table, head):
    """A tied table whose type matches `--head` feeds both MatMulNBits (the head) and
    GatherBlockQuantized (the embedding) from the same carried blocks."""
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen2", Q.Q4_1, types={"model.embed_tokens.weight": Q[table]})
    fp32 = export(path, tmp_path / "fp32")
    carried = export(path, tmp_path / "q", "int4", accuracy_level=0, head=head)
    ids = prompt_ids(fp32)
    # float32 rounding only (these random weights give logits up to ~20); quantizing again
    # moves them by whole units (11.6 measured for the Q4_1 + Q4_0 file below)
    np.testing.assert_allclose(logits(carried, ids), logits(fp32, ids), atol=3e-4)
    weights = json.loads((carried / "fermi.json").read_text())["weights"]
    assert weights["model.embed_tokens.weight"] == {"gguf_type": table, "stored": "carried"}
    assert weights["model.layers.1.mlp.down_proj.weight"]["stored"] == "carried"


def matmul_nbits(artifact: Path) -> dict[str, dict]:
    """Node name -> attributes of every MatMulNBits node of an artifact's graph."""
    import onnx

    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    return {
        node.name: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }


@pytest.mark.parametrize(
    ("args", "bits", "block"),
    [(["--precision", "int8"], 8, 32), (["--precision", "int4", "--block-size", "64"], 4, 64)],
)
def test_blocks_carry_only_at_the_precision_and_block_size_asked(tmp_path, args, bits, block):
    """`fermi export FILE.Q4_1.gguf --precision int8` is an int8 graph (Q4_1 blocks are 4-bit, so
    they are quantized again), and --block-size 64 gives 64-wide blocks, not the file's 32; the
    manifest says "requantized" and records the block size the graph has."""
    path = tmp_path / "m.Q4_1.gguf"
    write_gguf(path, "llama", Q.Q4_1, tied=False)
    out = tmp_path / "art"
    done = run_export(str(path), "--output", str(out), "--target", "cpu", *args)
    assert done.returncode == 0, done.stderr
    layers = {name: n for name, n in matmul_nbits(out).items() if "layers." in name}
    # (int4's mix keeps a few sensitive matmuls at int8, with their own block)
    assert layers and all(n["block_size"] == block for n in layers.values() if n["bits"] == bits)
    assert all(n["block_size"] != 32 for n in layers.values()) or block == 32
    q_proj = next(n for name, n in layers.items() if "q_proj" in name or "qkv" in name)
    assert q_proj["bits"] == bits
    if bits == 8:
        assert {n["bits"] for n in layers.values()} == {8}
    manifest = json.loads((out / "fermi.json").read_text())
    assert manifest["graph_options"]["block_size"] == block
    stored = {name: w["stored"] for name, w in manifest["weights"].items()}
    assert stored["model.layers.0.self_attn.q_proj.weight"] == "requantized"
    assert stored["model.layers.1.mlp.down_proj.weight"] == "requantized"
    assert "carried" not in stored.values()
