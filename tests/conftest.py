"""Shared fixtures: the built-in tiny-qwen3 checkpoint exported once per test run."""

from __future__ import annotations

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
