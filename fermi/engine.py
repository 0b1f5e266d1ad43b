"""The onnxruntime engine: one InferenceSession over an artifact, and a forward step that takes
new token ids plus a KV cache and returns logits.

One session serves every concurrent sequence (onnxruntime's `run` is thread-safe), so an engine
pool of N means N sequences in flight over one copy of the weights.

Every step runs with IO binding: the cache buffers are bound where they live (the GPU on CUDA)
and never pass through numpy; the last-position logits go into a buffer reused from step to
step. How the graph is fed depends on the artifact's `io_mode` (see fermi/kv_cache.py and
export/ops*.py): one small class per mode below.
"""

from __future__ import annotations

import platform
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fermi.artifact import MODEL_FILE, Manifest, load_manifest
from fermi.errors import ArtifactError, DeviceUnavailable
from fermi.huge_pages import HugePages, anonymous_mappings
from fermi.kv_cache import KVCache, Resizer, SharedKVCache, WindowKVCache
from fermi.verify import check_graph_io, ort_ports, verify_files

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# The CoreML graph is checked against the ML Program op list (export/coreml_support.py).
PROVIDER_OPTIONS = {"coreml": {"ModelFormat": "MLProgram"}}
# onnxruntime's CPU kernels mostly lack fp16; GPU and the Neural Engine want it.
PRECISION = {"cuda": "fp16", "coreml": "fp16", "cpu": "fp32"}
MASKED = -1e9  # additive attention bias of a hidden key (the window graph)


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


def session_options(
    threads: int, config: dict[str, str] | None = None, spin: bool = False
) -> ort.SessionOptions:
    """`config`: the artifact's own session config entries (manifest.session_config)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    # Spinning intra-op threads answer the next kernel a few microseconds sooner (about 5% faster
    # decode on an idle machine) but burn the cores they wait on: when other work holds a core
    # they slow decode down by a third or more and starve the tokenizer, sampler and server
    # threads. Off unless asked for (FERMI_SPIN).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def providers_for(device: str) -> list:
    first = (
        (PROVIDERS[device], PROVIDER_OPTIONS[device])
        if device in PROVIDER_OPTIONS
        else (PROVIDERS[device])
    )
    return [first] if device == "cpu" else [first, PROVIDERS["cpu"]]


class Engine:
    def __init__(
        self,
        artifact: Path,
        device: str = "auto",
        threads: int = 0,
        spin: bool = False,
        huge_pages: bool = True,
    ):
        """Load `artifact` on `device` ("auto", "cpu", "cuda", "coreml"). `threads`: intra-op
        threads (0: onnxruntime's default); `spin`: let them spin between kernels;
        `huge_pages`: on the CPU, collapse the buffers onnxruntime allocates while loading
        (its prepacked weights) into transparent huge pages, on a background thread
        (fermi/huge_pages.py). Raises ArtifactError (a file missing, corrupt or not loadable)
        and DeviceUnavailable."""
        started = time.perf_counter()
        self.artifact = Path(artifact)
        self.manifest: Manifest = load_manifest(self.artifact)
        verify_files(self.artifact, self.manifest)  # sha256, unless recorded unchanged
        self.device = pick_device(device)
        before = anonymous_mappings() if huge_pages and self.device == "cpu" else None
        try:
            self.session = ort.InferenceSession(
                str(self.artifact / MODEL_FILE),
                sess_options=session_options(threads, self.manifest.session_config, spin),
                providers=providers_for(self.device),
            )
        except Exception as e:  # onnxruntime's Fail / InvalidProtobuf / InvalidGraph ...
            message = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            raise ArtifactError(
                f"{self.artifact / MODEL_FILE} cannot be loaded: {message}"
            ) from None
        check_graph_io(
            self.manifest,
            ort_ports(self.session.get_inputs()),
            ort_ports(self.session.get_outputs()),
        )
        m = self.manifest
        self.kv_dtype = np.dtype(m.kv_dtype)
        self.past_names = [n for n in m.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in m.outputs if n.startswith("present.")]
        # Where the cache lives: CoreML reads and writes host memory.
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"
        if m.io_mode not in IO_MODES:
            raise ArtifactError(f"{self.artifact}: unknown io_mode {m.io_mode!r} in the manifest")
        self.io = IO_MODES[m.io_mode](self)
        self.huge_pages = HugePages(before) if before is not None else None
        self.load_seconds = time.perf_counter() - started

    def new_cache(self):
        return self.io.new_cache()

    def forward(self, token_ids: list[int], cache, last_only: bool = True) -> np.ndarray:
        """Run `token_ids` after the cache's positions; returns float32 logits, (V,) for the last
        position or (S, V) for all of them, and advances the cache."""
        return self.io.forward(token_ids, cache, last_only)


class ConcatIO:
    """The portable graph: past in, concat(past, new) out; logits for every position."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def new_cache(self) -> KVCache:
        m = self.engine.manifest
        return KVCache(m.num_layers, m.num_kv_heads, m.head_dim, self.engine.kv_dtype)

    def forward(self, token_ids: list[int], cache: KVCache, last_only: bool) -> np.ndarray:
        e = self.engine
        seq = len(token_ids)
        total = cache.offset + seq
        binding = e.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(cache.offset, total, dtype=np.int64)[None])
        for name, value in zip(e.past_names, cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in e.present_names:
            binding.bind_output(name, e._ort_device)
        e.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.update(list(outputs[1:]))
        logits = outputs[0].numpy()[0]  # (S, V)
        return logits[-1] if last_only else logits


class LogitsIO:
    """Shared by the graphs that take `logits_index`: the last-position logits land in a (1, 1,
    V) host buffer reused across steps (one per thread: one session serves several threads)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._local = threading.local()

    def bind_logits(self, binding, seq: int, last_only: bool):
        index = np.array([seq - 1] if last_only else range(seq), dtype=np.int64)
        binding.bind_cpu_input("logits_index", index)
        if not last_only:
            binding.bind_output("logits", "cpu")
            return None
        buffer = getattr(self._local, "logits", None)
        if buffer is None:
            array = np.empty((1, 1, self.engine.manifest.vocab_size), np.float32)
            buffer = self._local.logits = (array, ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_output("logits", buffer[1])
        return buffer[0]

    def step(self, binding, past: list, present: list, cache, seq: int, last_only: bool):
        """Bind the cache buffers (past[i] read, present[i] written) and the logits, run the
        step on the inputs already bound, advance the cache by `seq`; returns the logits."""
        e = self.engine
        for past_name, present_name, old, new in zip(
            e.past_names, e.present_names, past, present, strict=True
        ):
            binding.bind_ortvalue_input(past_name, old)
            binding.bind_ortvalue_output(present_name, new)
        last_buffer = self.bind_logits(binding, seq, last_only)
        e.session.run_with_iobinding(binding)
        cache.advance(seq)
        if last_buffer is not None:
            return last_buffer[0, 0].copy()  # (V,); the buffer is reused by the next step
        return binding.get_outputs()[-1].numpy()[0]  # (S, V)


class SharedIO(LogitsIO):
    """The cpu/cuda graphs: one KV buffer per layer and kind bound as both past and present."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self._resizer: Resizer | None = None
        self._lock = threading.Lock()
        if engine._ort_device != "cpu":  # host caches grow with numpy; see fermi/kv_cache.py
            threading.Thread(target=self.resizer, name="kv-resizer", daemon=True).start()

    def resizer(self) -> Resizer:
        with self._lock:
            if self._resizer is None:
                e = self.engine
                self._resizer = Resizer(e.kv_dtype, providers_for(e.device))
            return self._resizer

    def new_cache(self) -> SharedKVCache:
        e, m = self.engine, self.engine.manifest
        return SharedKVCache(
            m.num_layers,
            m.num_kv_heads,
            m.head_dim,
            e.kv_dtype,
            m.context_length,
            self.resizer,
            e._ort_device,
        )

    def forward(self, token_ids: list[int], cache: SharedKVCache, last_only: bool) -> np.ndarray:
        e = self.engine
        seq = len(token_ids)
        total = cache.offset + seq
        cache.reserve(total)
        binding = e.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        return self.step(binding, cache.values, cache.values, cache, seq, last_only)


class WindowIO(LogitsIO):
    """The coreml graph: a fixed window whose slot j holds position j. The engine writes the
    additive mask (1, 1, S, W) and the one-hot slot map (1, 1, W, S) that places the new keys."""

    def new_cache(self) -> WindowKVCache:
        m = self.engine.manifest
        return WindowKVCache(
            m.num_layers, m.num_kv_heads, m.head_dim, self.engine.kv_dtype, m.context_length
        )

    def forward(self, token_ids: list[int], cache: WindowKVCache, last_only: bool) -> np.ndarray:
        e = self.engine
        seq, start = len(token_ids), cache.offset
        if start + seq > cache.window:
            raise ValueError(f"{start + seq} positions exceed the KV window of {cache.window}")
        rows = np.arange(seq)
        bias = np.full((1, 1, seq, cache.window), MASKED, np.float32)
        bias[0, 0, np.arange(cache.window)[None, :] <= start + rows[:, None]] = 0.0
        update = np.zeros((1, 1, cache.window, seq), e.kv_dtype)
        update[0, 0, start + rows, rows] = 1
        binding = e.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        binding.bind_cpu_input("position_ids", (start + rows)[None].astype(np.int64))
        binding.bind_cpu_input("attention_bias", bias)
        binding.bind_cpu_input("cache_update", update)
        return self.step(binding, cache.past, cache.present, cache, seq, last_only)


IO_MODES = {"concat": ConcatIO, "shared": SharedIO, "window": WindowIO}
