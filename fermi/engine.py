"""The onnxruntime engine: one InferenceSession over an artifact, and a forward step that takes
new token ids plus a KVCache and returns logits.

One session serves every concurrent sequence (onnxruntime's `run` is thread-safe), so an engine
pool of N means N sequences in flight over one copy of the weights."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fermi.artifact import MODEL_FILE, Manifest, load_manifest
from fermi.errors import DeviceUnavailable
from fermi.kv_cache import KVCache

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# onnxruntime's CPU kernels mostly lack fp16; GPU and the Neural Engine want it.
PRECISION = {"cuda": "fp16", "coreml": "fp16", "cpu": "fp32"}


def pick_device(requested: str) -> str:
    available = ort.get_available_providers()
    if requested == "auto":
        if PROVIDERS["cuda"] in available:
            return "cuda"
        if platform.system() == "Darwin" and PROVIDERS["coreml"] in available:
            return "coreml"
        return "cpu"
    if requested not in PROVIDERS:
        raise DeviceUnavailable(f"unknown device {requested!r}: use auto, cpu, cuda or coreml")
    if PROVIDERS[requested] not in available:
        hint = {
            "cuda": "install onnxruntime-gpu (pip install 'fermi[cuda]') on a machine with CUDA",
            "coreml": "the CoreML provider ships in onnxruntime's macOS wheels only",
        }.get(requested, "")
        raise DeviceUnavailable(
            f"device {requested!r} is not available in this onnxruntime "
            f"(providers: {', '.join(available)}); {hint}"
        )
    return requested


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    # Decode runs one small step after another: spinning threads waste the cores that the
    # tokenizer, sampler and server need between steps.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Engine:
    def __init__(self, artifact: Path, device: str = "auto", threads: int = 0):
        started = time.perf_counter()
        self.artifact = Path(artifact)
        self.manifest: Manifest = load_manifest(self.artifact)
        self.device = pick_device(device)
        providers = [PROVIDERS[self.device]]
        if self.device != "cpu":
            providers.append(PROVIDERS["cpu"])
        self.session = ort.InferenceSession(
            str(self.artifact / MODEL_FILE),
            sess_options=session_options(threads),
            providers=providers,
        )
        m = self.manifest
        self.kv_dtype = np.dtype(m.kv_dtype)
        self.past_names = [
            f"past_key_values.{i}.{kind}" for i in range(m.num_layers) for kind in ("key", "value")
        ]
        self.present_names = [
            f"present.{i}.{kind}" for i in range(m.num_layers) for kind in ("key", "value")
        ]
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"
        self.load_seconds = time.perf_counter() - started

    def new_cache(self) -> KVCache:
        m = self.manifest
        return KVCache(m.num_layers, m.num_kv_heads, m.head_dim, self.kv_dtype)

    def forward(self, token_ids: list[int], cache: KVCache, last_only: bool = True) -> np.ndarray:
        """Run `token_ids` after the cache's positions; returns float32 logits, (V,) for the last
        position or (S, V) for all of them, and advances the cache."""
        seq = len(token_ids)
        total = cache.offset + seq
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(cache.offset, total, dtype=np.int64)[None])
        for name, value in zip(self.past_names, cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self._ort_device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.update(list(outputs[1:]))
        logits = outputs[0].numpy()[0]  # (S, V)
        return logits[-1] if last_only else logits
