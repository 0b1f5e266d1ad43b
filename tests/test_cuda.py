"""The CUDA path: only where onnxruntime has the CUDA provider (onnxruntime-gpu on a machine
with an NVIDIA GPU), skipped elsewhere; run them there with `pytest tests/test_cuda.py`.

They check what the CPU tests cannot: the cuda graph on the CUDA provider agrees with the fp32
graph, the KV cache lives on the GPU (IO binding, never copied through the host) and stays
there when it grows, and the runtime picks the cuda target at fp16 by itself."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("needs onnxruntime-gpu and an NVIDIA GPU", allow_module_level=True)

torch = pytest.importorskip("torch")

from test_export_parity import CASES, make_checkpoint  # noqa: E402
from test_fast_graphs import engine_logits, export, random_ids  # noqa: E402

from fermi.engine import Engine  # noqa: E402
from fermi.requests import Finished, GenerationRequest, Message, SamplingParams  # noqa: E402
from fermi.runtime import Runtime  # noqa: E402
from fermi.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    family, fields = CASES["qwen3-tied"]
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), family, fields)


def test_cuda_graph_on_the_gpu_agrees_with_fp32(checkpoint, tmp_path):
    engine = Engine(export(checkpoint, tmp_path, "cuda", "fp16"), "cuda")
    assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
    ids = random_ids(20)
    got = engine_logits(engine, ids)
    expected = engine_logits(Engine(export(checkpoint, tmp_path, "cpu"), "cpu"), ids)
    assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_kv_cache_stays_on_the_gpu_as_it_grows(checkpoint, tmp_path):
    engine = Engine(export(checkpoint, tmp_path, "cuda", "fp16"), "cuda")
    ids = random_ids(40, seed=1)
    cache = engine.new_cache()
    cache.reserve(8)
    engine.forward(ids[:8], cache)
    assert {value.device_name().lower() for value in cache.values} == {"cuda"}
    first = cache.capacity
    steps = [engine.forward([token], cache) for token in ids[8:]]  # grows past 8 positions
    assert cache.capacity > first and cache.offset == len(ids)
    assert {value.device_name().lower() for value in cache.values} == {"cuda"}
    fresh = engine.new_cache()
    fresh.reserve(len(ids))
    expected = engine.forward(ids, fresh, last_only=False)[-1]
    np.testing.assert_allclose(steps[-1], expected, atol=0.01 * np.abs(expected).max())


def test_runtime_picks_the_cuda_target_at_fp16(tmp_path):
    runtime = Runtime.load(Settings(model="tiny-qwen3", device="cuda", artifacts=str(tmp_path)))
    assert (runtime.manifest.target, runtime.manifest.precision) == ("cuda", "fp16")
    request = GenerationRequest(
        messages=[Message("user", "Hello")],
        max_new_tokens=8,
        sampling=SamplingParams(temperature=0.0),
        ignore_eos=True,
        thinking="off",
    )
    finished = [e for e in runtime.submit(request) if isinstance(e, Finished)]
    assert finished[-1].usage.completion_tokens == 8
