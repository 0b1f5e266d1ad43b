"""A host KV cache grows with a numpy copy: the first growth in a process builds no onnxruntime
session and imports no onnx (that cost a ~190 ms stall in the middle of a decode), and what the
cache held survives the growth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fermi import kv_cache
from fermi.engine import Engine


@pytest.fixture(scope="module")
def cpu_artifact(tmp_path_factory):
    from export.exporter import export_model

    out = tmp_path_factory.mktemp("growth") / "tiny-cpu"
    return export_model("tiny-qwen3", "fp32", out, target="cpu")


def run_tokens(engine: Engine, cache, ids: list[int], step: int) -> list[np.ndarray]:
    return [engine.forward(ids[i : i + step], cache) for i in range(0, len(ids), step)]


def test_growth_keeps_the_cache_and_builds_no_resizer(cpu_artifact, monkeypatch):
    engine = Engine(cpu_artifact)

    def no_resizer(*_args, **_kwargs):
        raise AssertionError("a host cache must not build a Resizer")

    monkeypatch.setattr(kv_cache, "Resizer", no_resizer)
    monkeypatch.setattr(engine.io, "resizer", no_resizer)
    ids = [int(i) for i in np.random.default_rng(0).integers(10, 200, size=600)]
    growing = engine.new_cache()
    grown = run_tokens(engine, growing, ids[:8], 8) + run_tokens(engine, growing, ids[8:], 1)
    assert growing.capacity >= 600 and growing.offset == 600
    preallocated = engine.new_cache()
    preallocated.reserve(len(ids))
    expected = run_tokens(engine, preallocated, ids[:8], 8) + run_tokens(
        engine, preallocated, ids[8:], 1
    )
    assert preallocated.capacity == 600
    for got, want in zip(grown, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_first_growth_in_a_process_imports_no_onnx(cpu_artifact):
    script = textwrap.dedent(
        f"""
        import sys
        from fermi.engine import Engine
        engine = Engine({str(cpu_artifact)!r})
        cache = engine.new_cache()
        engine.forward(list(range(5, 15)), cache)
        for token in range(300):
            engine.forward([token % 100 + 5], cache)
        assert cache.capacity >= 310, cache.capacity
        print("onnx" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
