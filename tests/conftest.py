"""Shared fixtures: the built-in tiny-qwen3 checkpoint exported once per test run, and Qwen3's
real tokenizer and chat template."""

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
