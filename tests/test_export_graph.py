"""Reading checkpoints (bf16 through safetensors' numpy reader, shards), the random real-shape
checkpoint maker, and the structure of the emitted graph: opset 18 standard ops, one external
weights file, tied embeddings stored once, the I/O contract."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models

from export import random_checkpoint
from export.checkpoint import INDEX_FILE, Checkpoint
from export.exporter import export_model
from export.graph import ALIGN, OPSET
from fermi.artifact import MODEL_FILE, WEIGHTS_FILE, load_manifest

QWEN3_TOKENIZER = Path(__file__).parent / "data" / "qwen3-tokenizer"
SMALL_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}


@pytest.fixture
def mixed_dtype_file(tmp_path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    tensors = {
        "bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "f32": rng.standard_normal((2, 2, 2)).astype(np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_checkpoint_reads_bf16_f16_f32_with_safetensors(mixed_dtype_file):
    path, tensors = mixed_dtype_file
    (path.parent / "config.json").write_text("{}")
    with Checkpoint(path.parent) as checkpoint:
        for name, expected in tensors.items():
            got = checkpoint.tensor(name)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


def test_gguf_writer_input_reads_every_tensor(mixed_dtype_file):
    from fermi.bench.gguf_export import read_tensors

    path, tensors = mixed_dtype_file
    got = dict(read_tensors(path.parent))
    assert got.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert got[name].dtype == expected.dtype
        np.testing.assert_array_equal(got[name], expected)


def run_prefill(artifact: Path, ids: list[int]) -> np.ndarray:
    m = load_manifest(artifact)
    session = ort.InferenceSession(str(artifact / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": np.array([ids]),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "position_ids": np.arange(len(ids))[None],
    }
    empty = np.zeros((1, m.num_kv_heads, 0, m.head_dim), m.kv_dtype)
    feeds.update({name: empty for name in m.inputs[3:]})
    return session.run(["logits"], feeds)[0]


def test_sharded_random_checkpoint_exports_like_a_single_file(tmp_path):
    one = random_checkpoint.write_random_checkpoint(tmp_path / "one", SMALL_SHAPE, vocab_size=384)
    sharded = random_checkpoint.write_random_checkpoint(
        tmp_path / "sharded", SMALL_SHAPE, vocab_size=384, max_shard_bytes=20_000
    )
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded / "model.safetensors").exists()
    ids = [5, 17, 300, 42, 7]
    logits_one = run_prefill(export_model(str(one), "fp32", tmp_path / "a1"), ids)
    logits_sharded = run_prefill(export_model(str(sharded), "fp32", tmp_path / "a2"), ids)
    assert np.isfinite(logits_one).all() and logits_one.shape == (1, 5, 384)
    np.testing.assert_array_equal(logits_one, logits_sharded)


def test_random_checkpoint_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(random_checkpoint.SHAPES, "qwen3-small", SMALL_SHAPE)
    random_checkpoint.main(["--shape", "qwen3-small", "--output", str(tmp_path / "ckpt")])
    directory = Path(capsys.readouterr().out.strip())
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == random_checkpoint.QWEN3_VOCAB
    assert (config["torch_dtype"], config["architectures"]) == ("bfloat16", ["Qwen3ForCausalLM"])
    assert {k: config[k] for k in SMALL_SHAPE} == SMALL_SHAPE
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file()
    with Checkpoint(directory) as checkpoint:
        embed = checkpoint.tensor("model.embed_tokens.weight")
    assert embed.dtype == ml_dtypes.bfloat16 and embed.shape == (151936, 32)
    artifact = export_model(str(directory), "fp16", tmp_path / "art")
    assert np.isfinite(run_prefill(artifact, [1, 2, 3])).all()


def test_random_checkpoint_with_qwen3s_real_tokenizer(tmp_path, monkeypatch, capsys):
    """--tokenizer takes Qwen3's real tokenizer (the repo keeps it xz-compressed): its eos ids
    go into the configs, and the exported model's chat prompt and tokens are Qwen3's, so a
    random id decodes to text."""
    monkeypatch.setitem(random_checkpoint.SHAPES, "qwen3-small", SMALL_SHAPE)
    random_checkpoint.main(["--shape", "qwen3-small", "--output", str(tmp_path / "ckpt"),
                            "--tokenizer", str(QWEN3_TOKENIZER)])  # fmt: skip
    directory = Path(capsys.readouterr().out.strip())
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tokenizer.get_vocab_size() > 150_000
    config = json.loads((directory / "config.json").read_text())
    generation = json.loads((directory / "generation_config.json").read_text())
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>") == 151645
    assert set(generation["eos_token_id"]) == {151645, 151643}
    assert (
        "enable_thinking"
        in json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert tokenizer.decode([9707, 1879]).strip()  # ordinary ids are text
    with pytest.raises(ValueError, match="no <|im_end|>"):
        random_checkpoint.write_random_checkpoint(
            tmp_path / "bad", SMALL_SHAPE, tokenizer_dir=bad_tokenizer(tmp_path / "tok")
        )


def bad_tokenizer(directory: Path) -> Path:
    """A tokenizer directory without Qwen's special tokens."""
    directory.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(directory / "tokenizer.json")
    )
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def test_real_shapes_match_qwen3():
    shape = random_checkpoint.SHAPES["qwen3-0.6b"]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]) == (
        1024,
        3072,
        28,
    )
    assert random_checkpoint.SHAPES["qwen3-1.7b"]["hidden_size"] == 2048


@pytest.fixture(scope="module")
def tiny_graph(tiny_artifact_fp16) -> onnx.ModelProto:
    return onnx.load(str(tiny_artifact_fp16 / MODEL_FILE), load_external_data=False)


def test_graph_is_portable_opset_18(tiny_artifact_fp16, tiny_graph):
    assert [(o.domain, o.version) for o in tiny_graph.opset_import] == [("", OPSET)]
    assert {n.domain for n in tiny_graph.graph.node} == {""}
    onnx.checker.check_model(str(tiny_artifact_fp16 / MODEL_FILE))  # path-based: external data


def test_weights_are_external_in_one_aligned_file(tiny_artifact_fp16, tiny_graph):
    size = (tiny_artifact_fp16 / WEIGHTS_FILE).stat().st_size
    external = [
        t for t in tiny_graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert len(external) == 1 + 2 * 11 + 1  # embedding, 11 per layer, final norm
    for tensor in external:
        entry = {e.key: e.value for e in tensor.external_data}
        assert entry["location"] == WEIGHTS_FILE
        assert int(entry["offset"]) % ALIGN == 0
        assert int(entry["offset"]) + int(entry["length"]) <= size


def test_tied_embedding_is_stored_once(tiny_graph):
    names = [t.name for t in tiny_graph.graph.initializer]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    users = {n.op_type for n in tiny_graph.graph.node if "model.embed_tokens.weight" in n.input}
    assert users == {"Gather", "Gemm"}


def test_io_contract(tiny_graph):
    def signature(values):
        return {
            v.name: (
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        }

    inputs, outputs = signature(tiny_graph.graph.input), signature(tiny_graph.graph.output)
    int64, fp16, fp32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert inputs["input_ids"] == (int64, ["batch", "seq"])
    assert inputs["attention_mask"] == (int64, ["batch", "total_seq"])
    assert inputs["position_ids"] == (int64, ["batch", "seq"])
    assert inputs["past_key_values.1.value"] == (fp16, ["batch", 2, "past_seq", 32])
    assert outputs["logits"][0] == fp32  # float32 logits even from the fp16 graph
    assert outputs["present.1.key"] == (fp16, ["batch", 2, "total_seq", 32])
