"""A sequence's KV cache as onnxruntime values that stay where the engine put them. One class
per graph I/O mode (the manifest's `io_mode`); all share the small interface the runtime uses:
`offset` (tokens held), `trim(length)`, `nbytes`, and `reserve(length)`, which prefill calls
with the prompt length so that a growable cache is allocated once.

- `KVCache` ("concat", the portable graph): the graph returns present = concat(past, new); we
  keep those outputs and bind them as the next step's past, so the cache never passes through
  numpy between steps. Only `trim` copies.
- `SharedKVCache` ("shared", the cpu/cuda graphs): one buffer per layer and kind that the graph
  reads as past and writes as present in place. It starts small and grows in steps (one copy per
  growth, layer by layer), never to the full context up front; `trim` only moves the offset.
  On the host a growth is a numpy copy between views of the two buffers;
  on a GPU it is a one-node onnxruntime graph, built when the engine loads (not on the first
  growth, which would stall that step while onnx is imported and a session is made).
- `WindowKVCache` ("window", the coreml graph): a fixed window allocated once, two buffers per
  layer and kind that the steps read and write in turn (the graph has no in-place ops).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

STEP = 256  # a shared cache grows by at least this many positions, or a quarter of itself


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: np.dtype):
        self.num_layers = num_layers
        self.dtype = np.dtype(dtype)
        empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=self.dtype)  # (B, KV, T, D)
        self.values: list[ort.OrtValue] = [
            ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * num_layers)
        ]
        self._bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.dtype.itemsize
        self.offset = 0  # tokens held

    def reserve(self, length: int) -> None:
        """Nothing to do: every step allocates its concatenated outputs."""

    def update(self, presents: list[ort.OrtValue]) -> None:
        """Adopt the graph's present.* outputs (key, value per layer, in graph order)."""
        self.values = presents
        self.offset = presents[0].shape()[2]

    def trim(self, length: int) -> None:
        """Keep only the first `length` positions (the common prefix with a new prompt)."""
        if length >= self.offset:
            return
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]))
            for v in self.values
        ]
        self.offset = length

    @property
    def nbytes(self) -> int:
        return self.offset * self._bytes_per_token

    def save(self, length: int) -> list[np.ndarray]:
        """Host copies of the first `length` positions, (1, KV, length, D) per layer and kind."""
        return [np.ascontiguousarray(v.numpy()[:, :, :length]) for v in self.values]

    def load(self, values: list[np.ndarray], length: int) -> None:
        """Hold the first `length` positions of `values` (what `save` returned), nothing else."""
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v[:, :, :length])) for v in values
        ]
        self.offset = length


class Resizer:
    """Copies a (1, KV, C, D) buffer into a larger one on the buffer's own device, with a
    one-node onnxruntime graph (Pad), so that growing a CUDA cache never goes through the host."""

    def __init__(self, dtype: np.dtype, providers: list):
        from onnx import TensorProto, helper  # only when a cache first grows: keeps load fast

        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph = helper.make_graph(
            [helper.make_node("Pad", ["x", "pads"], ["y"], mode="constant")],
            "resize",
            [
                helper.make_tensor_value_info("x", elem, [1, "kv", "old", "d"]),
                helper.make_tensor_value_info("pads", TensorProto.INT64, [8]),
            ],
            [helper.make_tensor_value_info("y", elem, [1, "kv", "new", "d"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 10
        self.session = ort.InferenceSession(model.SerializeToString(), providers=providers)

    def __call__(self, value: ort.OrtValue, capacity: int, device: str) -> ort.OrtValue:
        extra = capacity - value.shape()[2]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x", value)
        binding.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, extra, 0], np.int64))
        binding.bind_output("y", device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


class SharedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: np.dtype,
        max_length: int,
        resizer: Callable[[], Resizer],
        device: str = "cpu",
    ):
        self.dtype = np.dtype(dtype)
        self.max_length = max_length
        self.device = device
        self._resizer = resizer  # returns the engine's Resizer, made on first use
        self._shape = (1, num_kv_heads, 0, head_dim)  # (B, KV, capacity, D)
        self.values: list[ort.OrtValue] = [self._empty(0) for _ in range(2 * num_layers)]
        self._bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.dtype.itemsize
        self.capacity = 0
        self.offset = 0  # tokens held

    def _empty(self, capacity: int) -> ort.OrtValue:
        shape = (*self._shape[:2], capacity, self._shape[3])
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device)

    def _grow(self, value: ort.OrtValue, capacity: int) -> ort.OrtValue:
        """A buffer of `capacity` positions starting with `value`'s (the rest uninitialised:
        the graph reads only up to the offset)."""
        if self.device != "cpu":
            return self._resizer()(value, capacity, self.device)
        grown = self._empty(capacity)
        held = value.shape()[2]
        grown.numpy()[:, :, :held] = value.numpy()  # host OrtValues' numpy() are views
        return grown

    def reserve(self, length: int) -> None:
        """Make room for `length` positions. An empty cache gets exactly that (prefill asks for
        its prompt plus a little room); a filled one grows by a quarter or STEP positions,
        whichever is more, up to max_length, so that decoding grows it rarely. Layers are
        copied one at a time: a growth briefly holds the new buffers plus a single old one."""
        if length <= self.capacity:
            return
        if length > self.max_length:
            raise ValueError(f"{length} positions exceed the context length {self.max_length}")
        grown = self.capacity + max(STEP, self.capacity // 4) if self.offset else 0
        capacity = min(self.max_length, max(length, grown))
        for i, value in enumerate(self.values):
            self.values[i] = self._grow(value, capacity) if self.offset else self._empty(capacity)
        self.capacity = capacity

    def advance(self, count: int) -> None:
        self.offset += count

    def trim(self, length: int) -> None:
        """Keep the first `length` positions: the graph reads only up to the offset, and the
        next step overwrites what lies beyond it."""
        self.offset = min(self.offset, length)

    @property
    def nbytes(self) -> int:
        """Bytes held (the allocated capacity, not just the used part)."""
        return self.capacity * self._bytes_per_token


class WindowKVCache:
    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: np.dtype, window: int
    ):
        self.dtype = np.dtype(dtype)
        self.window = window
        shape = (1, num_kv_heads, window, head_dim)  # (B, KV, W, D); slot = position
        self.buffers = [
            [
                ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype))
                for _ in range(2 * num_layers)
            ]
            for _ in range(2)
        ]
        self._bytes = 2 * 2 * num_layers * window * num_kv_heads * head_dim * self.dtype.itemsize
        self.offset = 0
        self._turn = 0

    def reserve(self, length: int) -> None:
        """Nothing to do: the window is allocated once (the engine checks the bound)."""

    @property
    def past(self) -> list[ort.OrtValue]:
        return self.buffers[self._turn]

    @property
    def present(self) -> list[ort.OrtValue]:
        return self.buffers[1 - self._turn]

    def advance(self, count: int) -> None:
        """After a step: what was written becomes the next step's input."""
        self.offset += count
        self._turn = 1 - self._turn

    def trim(self, length: int) -> None:
        """Slots past the offset are masked out and overwritten by the next steps."""
        self.offset = min(self.offset, length)

    def save(self, length: int) -> list[np.ndarray]:
        """Host copies of the first `length` positions, (1, KV, length, D) per layer and kind."""
        return [np.ascontiguousarray(v.numpy()[:, :, :length]) for v in self.past]

    def load(self, values: list[np.ndarray], length: int) -> None:
        """Hold the first `length` positions of `values` (what `save` returned)."""
        for target, value in zip(self.past, values, strict=True):
            target.numpy()[:, :, :length] = value[:, :, :length]  # host OrtValues: views
        self.offset = length

    @property
    def nbytes(self) -> int:
        return self._bytes
